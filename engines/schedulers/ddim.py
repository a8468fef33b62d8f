"""DDIM (Song et al. 2021), deterministic (eta = 0): a port of diffusers' `DDIMScheduler`."""

from __future__ import annotations

import numpy as np

from ._common import COMMON_SCHEMA, Scheduler, alphas_and_final, spaced_timesteps

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class DDIMScheduler(Scheduler):
    """Deterministic DDIM. Config keys as diffusers' DDIMScheduler (defaults too: clip_sample=True,
    set_alpha_to_one=True); `thresholding` (dynamic thresholding) and `rescale_betas_zero_snr` are
    supported; eta > 0 (stochastic DDIM) is not offered."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    SCHEMA = {
        **COMMON_SCHEMA,
        "clip_sample": (True, "bool", None),
        "set_alpha_to_one": (True, "bool", None),
        "prediction_type": ("epsilon", "str", PREDICTION_TYPES),
        "thresholding": (False, "bool", None),
        "dynamic_thresholding_ratio": (0.995, "float", None),
        "clip_sample_range": (1.0, "float", None),
        "sample_max_value": (1.0, "float", None),
        "rescale_betas_zero_snr": (False, "bool", None),
    }

    def __init__(self, **config):
        super().__init__(**config)
        self.alphas_cumprod, self.final_alpha_cumprod = alphas_and_final(self.config)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose `num_inference_steps` timesteps (int64, descending) per `timestep_spacing`."""
        self._check_steps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        c = self.config
        self.timesteps = spaced_timesteps(
            c["timestep_spacing"], c["num_train_timesteps"], self.num_inference_steps, c["steps_offset"]
        )

    def _threshold_sample(self, sample: np.ndarray) -> np.ndarray:
        b, ch = sample.shape[:2]
        flat = sample.reshape(b, -1)
        s = np.quantile(np.abs(flat), self.config["dynamic_thresholding_ratio"], axis=1).astype(np.float32)
        s = np.clip(s, 1, self.config["sample_max_value"])[:, None]
        return (np.clip(flat, -s, s) / s).reshape(sample.shape).astype(sample.dtype)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        """x_t -> x_{t-Δ}. `model_output` [B,C,H,W] is the model's prediction of the configured type."""
        self._require_timesteps()
        c = self.config
        timestep = int(timestep)
        prev_timestep = timestep - c["num_train_timesteps"] // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        if c["prediction_type"] == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
            pred_epsilon = model_output
        elif c["prediction_type"] == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
        else:  # v_prediction
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
            pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample

        if c["thresholding"]:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif c["clip_sample"]:
            r = c["clip_sample_range"]
            pred_original_sample = np.clip(pred_original_sample, -r, r)

        # eta = 0: no variance term; the direction term keeps its (1 - alpha_prev) ** 0.5 weight
        pred_sample_direction = (1 - alpha_prod_t_prev) ** (0.5) * pred_epsilon
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
        return prev_sample.astype(np.float32, copy=False)
