"""Euler (Karras et al. 2022, Algorithm 2 without churn): a port of diffusers' `EulerDiscreteScheduler`.

The model input is scaled by 1/sqrt(sigma^2 + 1) (`scale_model_input`) and the initial noise by
`init_noise_sigma`; timesteps are float32 and may be fractional, so the UNet graph takes a float
timestep. Supported: linear/log_linear interpolation, Karras and exponential sigmas, final sigma
"zero"/"sigma_min". Not ported: beta sigmas (needs scipy), continuous timesteps, s_churn > 0.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import SchedulerConfigError
from ._common import COMMON_SCHEMA, Scheduler, alphas_cumprod_f32, make_betas, trailing_timesteps

PREDICTION_TYPES = ("epsilon", "sample", "original_sample", "v_prediction")


class EulerDiscreteScheduler(Scheduler):
    """Config keys and defaults as diffusers' EulerDiscreteScheduler (timestep_spacing="linspace")."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    SCHEMA = {
        **COMMON_SCHEMA,
        "timestep_spacing": ("linspace", "str", ("linspace", "leading", "trailing")),
        "prediction_type": ("epsilon", "str", PREDICTION_TYPES),
        "interpolation_type": ("linear", "str", ("linear", "log_linear")),
        "use_karras_sigmas": (False, "bool", None),
        "use_exponential_sigmas": (False, "bool", None),
        "use_beta_sigmas": (False, "bool", None),
        "sigma_min": (None, "optfloat", None),
        "sigma_max": (None, "optfloat", None),
        "timestep_type": ("discrete", "str", ("discrete", "continuous")),
        "rescale_betas_zero_snr": (False, "bool", None),
        "final_sigmas_type": ("zero", "str", ("zero", "sigma_min")),
    }
    UNSUPPORTED = (
        ("use_beta_sigmas", bool, "beta sigmas are not ported (they need scipy); use karras or exponential"),
        ("timestep_type", lambda v: v == "continuous", "continuous timesteps are not ported"),
    )

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["use_karras_sigmas"] and self.config["use_exponential_sigmas"]:
            raise SchedulerConfigError(
                "scheduler config: use_karras_sigmas and use_exponential_sigmas are exclusive"
            )
        betas = make_betas(self.config)
        self.alphas_cumprod = alphas_cumprod_f32(betas)
        if self.config["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24  # avoid an infinite sigma, as diffusers does
        n = self.config["num_train_timesteps"]
        sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)[::-1]
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)]).astype(np.float32)
        self.timesteps = np.linspace(0, n - 1, n, dtype=float)[::-1].astype(np.float32)
        self._step_index = 0

    @property
    def init_noise_sigma(self) -> float:
        max_sigma = float(self.sigmas.max())
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int) -> None:
        """float32 timesteps (descending) and the matching sigmas (+ the final sigma)."""
        self._check_steps(num_inference_steps)
        n = self.num_inference_steps = int(num_inference_steps)
        c = self.config
        n_train = c["num_train_timesteps"]
        if c["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
        elif c["timestep_spacing"] == "leading":
            step_ratio = n_train // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.float32)
            timesteps += c["steps_offset"]
        else:
            timesteps = trailing_timesteps(n_train, n).astype(np.float32)

        sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        log_sigmas = np.log(sigmas)
        if c["interpolation_type"] == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        else:  # log_linear, computed in float32 like torch.linspace(...).exp()
            sigmas = np.exp(np.linspace(np.log(sigmas[-1]), np.log(sigmas[0]), n + 1).astype(np.float32))

        if c["use_karras_sigmas"]:
            sigmas = self._convert_to_karras(sigmas, n)
            timesteps = np.array([self._sigma_to_t(s, log_sigmas) for s in sigmas])
        elif c["use_exponential_sigmas"]:
            sigmas = self._convert_to_exponential(sigmas, n)
            timesteps = np.array([self._sigma_to_t(s, log_sigmas) for s in sigmas])

        if c["final_sigmas_type"] == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.float32)
        self._step_index = 0

    @staticmethod
    def _sigma_to_t(sigma, log_sigmas):
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.reshape(np.shape(sigma))

    def _sigma_range(self, in_sigmas):
        sigma_min = self.config["sigma_min"]
        sigma_max = self.config["sigma_max"]
        sigma_min = sigma_min if sigma_min is not None else float(in_sigmas[-1])
        sigma_max = sigma_max if sigma_max is not None else float(in_sigmas[0])
        return sigma_min, sigma_max

    def _convert_to_karras(self, in_sigmas, n):
        sigma_min, sigma_max = self._sigma_range(in_sigmas)
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho

    def _convert_to_exponential(self, in_sigmas, n):
        sigma_min, sigma_max = self._sigma_range(in_sigmas)
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """sample / sqrt(sigma^2 + 1) for the current step (the step index advances in `step`)."""
        sigma = self.sigmas[self._step_index]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32, copy=False)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        """Euler step from sigma_i to sigma_{i+1}; `timestep` is accepted for interface symmetry."""
        self._require_timesteps()
        i = self._step_index
        if i >= len(self.timesteps):
            raise RuntimeError("Euler: more steps than timesteps; call set_timesteps() again")
        sample = sample.astype(np.float32, copy=False)
        sigma = self.sigmas[i]
        sigma_hat = sigma * np.float32(1.0)  # gamma = 0 (no churn)
        pt = self.config["prediction_type"]
        if pt in ("sample", "original_sample"):
            pred_original_sample = model_output
        elif pt == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        else:  # v_prediction
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[i + 1] - sigma_hat
        self._step_index += 1
        return (sample + derivative * dt).astype(np.float32, copy=False)
