"""PNDM (Liu et al. 2022), the sampler of the APTP paper: a port of diffusers' `PNDMScheduler`.

With `skip_prk_steps=False` (diffusers' default) the first steps are the pseudo Runge-Kutta
warm-up (4 model calls per step on the last 3 timesteps' grid), then linear multistep (PLMS);
with `skip_prk_steps=True` (Stable Diffusion's config) it is PLMS from the start with a
2nd-order start-up. The number of model calls is `len(timesteps)`, which is larger than `steps`
with the PRK warm-up, exactly as in diffusers.
"""

from __future__ import annotations

import numpy as np

from ..errors import ParamError
from ._common import COMMON_SCHEMA, Scheduler, alphas_and_final, trailing_timesteps

PREDICTION_TYPES = ("epsilon", "v_prediction")


class PNDMScheduler(Scheduler):
    """Config keys and defaults as diffusers' PNDMScheduler (set_alpha_to_one=False, skip_prk_steps=False)."""

    name = "pndm"
    diffusers_class = "PNDMScheduler"
    SCHEMA = {
        **COMMON_SCHEMA,
        "skip_prk_steps": (False, "bool", None),
        "set_alpha_to_one": (False, "bool", None),
        "prediction_type": ("epsilon", "str", PREDICTION_TYPES),
    }
    pndm_order = 4

    def __init__(self, **config):
        super().__init__(**config)
        self.alphas_cumprod, self.final_alpha_cumprod = alphas_and_final(self.config)
        self._reset_state()

    def _reset_state(self) -> None:
        self.cur_model_output = 0
        self.counter = 0
        self.cur_sample = None
        self.ets: list[np.ndarray] = []

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Timesteps of the PRK warm-up (unless skipped) followed by the PLMS ones, int64."""
        self._check_steps(num_inference_steps)
        c = self.config
        if not c["skip_prk_steps"] and num_inference_steps < self.pndm_order:
            raise ParamError(f"steps must be >= {self.pndm_order} for PNDM with its Runge-Kutta warm-up "
                             f"(skip_prk_steps false), got {num_inference_steps}", "steps")
        n = self.num_inference_steps = int(num_inference_steps)
        n_train = c["num_train_timesteps"]
        if c["timestep_spacing"] == "linspace":
            base = np.linspace(0, n_train - 1, n).round().astype(np.int64)
        elif c["timestep_spacing"] == "leading":
            base = (np.arange(0, n) * (n_train // n)).round() + c["steps_offset"]
        else:  # trailing
            base = trailing_timesteps(n_train, n)[::-1].copy()

        if c["skip_prk_steps"]:
            self.prk_timesteps = np.array([])
            self.plms_timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            prk = np.array(base[-self.pndm_order:]).repeat(2) + np.tile(
                np.array([0, n_train // n // 2]), self.pndm_order
            )
            self.prk_timesteps = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
            self.plms_timesteps = base[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._reset_state()

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        """Dispatch to the PRK or PLMS update depending on the position in the schedule."""
        self._require_timesteps()
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            return self._step_prk(model_output, int(timestep), sample)
        return self._step_plms(model_output, int(timestep), sample)

    def _step_prk(self, model_output, timestep, sample):
        n_train = self.config["num_train_timesteps"]
        diff_to_prev = 0 if self.counter % 2 else n_train // self.num_inference_steps // 2
        prev_timestep = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])

        if self.counter % 4 == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif (self.counter - 1) % 4 == 0:
            self.cur_model_output += 1 / 3 * model_output
        elif (self.counter - 2) % 4 == 0:
            self.cur_model_output += 1 / 3 * model_output
        elif (self.counter - 3) % 4 == 0:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0

        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _step_plms(self, model_output, timestep, sample):
        n_train = self.config["num_train_timesteps"]
        if not self.config["skip_prk_steps"] and len(self.ets) < 3:
            raise RuntimeError("PNDM: PLMS step before the PRK warm-up finished")
        prev_timestep = timestep - n_train // self.num_inference_steps

        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + n_train // self.num_inference_steps

        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) == 2:
            model_output = (3 * self.ets[-1] - self.ets[-2]) / 2
        elif len(self.ets) == 3:
            model_output = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
        else:
            model_output = (1 / 24) * (
                55 * self.ets[-1] - 59 * self.ets[-2] + 37 * self.ets[-3] - 9 * self.ets[-4]
            )

        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _get_prev_sample(self, sample, timestep, prev_timestep, model_output):
        # formula (9) of the PNDM paper
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
        denom = alpha_prod_t * beta_prod_t_prev ** (0.5) + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** (0.5)
        prev = sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom
        return prev.astype(np.float32, copy=False)
