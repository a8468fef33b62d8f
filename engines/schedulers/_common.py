"""What the numpy schedulers share: reading a diffusers scheduler config, the beta schedules, the base class.

The schedulers are ports of diffusers' (0.42) `DDIMScheduler`, `PNDMScheduler` and
`EulerDiscreteScheduler`, written so that the same config JSON gives the same timesteps and,
step by step, the same latents (tests/test_schedulers.py holds them to 1e-5). Arithmetic is done
in float32 like diffusers' so that rounding follows the same path.

Config keys are read the way diffusers' `from_config` reads them: keys this scheduler knows are
used (missing ones take diffusers' defaults for that class), keys meant for other schedulers
(`skip_prk_steps` for DDIM, `variance_type`, `_class_name`, ...) are ignored and listed in
`ignored_keys`. Keys named in `_use_default_values` (diffusers' in-memory record of the keys its
source class filled with its own defaults, e.g. `dict(DDPMScheduler.from_config(...).config)`) are
dropped first, as diffusers' `from_config` drops them, so they take this class's defaults: a DDPM
config's `timestep_spacing="leading"` default does not override Euler's "linspace". A known key with a bad value, or a value that asks for a feature not ported here,
raises `SchedulerConfigError` naming the key.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from ..errors import SchedulerConfigError
from ..validation import is_int, is_number

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n, dtype=torch.float32)` on CPU, reproduced in numpy float32.

    torch fills the first half forwards from `start` and the second half backwards from `end`
    with a float32 step; reproducing it keeps the betas bit-identical to diffusers'.
    """
    if n == 1:
        return np.array([start], dtype=np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(n - 1)
    idx = np.arange(n)
    halfway = n // 2
    out = np.empty(n, dtype=np.float32)
    out[:halfway] = start32 + step * idx[:halfway].astype(np.float32)
    out[halfway:] = end32 - step * (n - idx[halfway:] - 1).astype(np.float32)
    return out


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine ("squaredcos_cap_v2") schedule of Nichol & Dhariwal, as diffusers computes it."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), as diffusers does."""
    alphas = 1.0 - betas
    alphas_bar_sqrt = np.sqrt(np.cumprod(alphas.astype(np.float64)).astype(np.float32))
    a0, a_t = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - a_t) * (a0 / (a0 - a_t))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod_f32(betas: np.ndarray) -> np.ndarray:
    """cumprod(1 - betas) as torch computes it for float32 (accumulated in double, stored as float32)."""
    alphas = (np.float32(1.0) - betas.astype(np.float32)).astype(np.float64)
    return np.cumprod(alphas).astype(np.float32)


def alphas_and_final(cfg: dict[str, Any]) -> tuple[np.ndarray, np.float32]:
    """alphas_cumprod and the 'previous' alpha of the last step (1.0 with set_alpha_to_one, else
    alphas_cumprod[0]), as diffusers' DDIM and PNDM schedulers set them up."""
    alphas_cumprod = alphas_cumprod_f32(make_betas(cfg))
    return alphas_cumprod, (np.float32(1.0) if cfg["set_alpha_to_one"] else alphas_cumprod[0])


def make_betas(cfg: dict[str, Any]) -> np.ndarray:
    """float32 betas [num_train_timesteps] from a resolved config."""
    n = cfg["num_train_timesteps"]
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
        if betas.ndim != 1 or len(betas) != n:
            raise SchedulerConfigError(
                f"scheduler config: trained_betas has {betas.size} values, num_train_timesteps is {n}"
            )
    elif cfg["beta_schedule"] == "linear":
        betas = linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    else:  # squaredcos_cap_v2 (validated before)
        betas = betas_for_alpha_bar(n)
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def _check(key: str, value: Any, kind: str, choices: tuple | None = None) -> Any:
    """Validate one config value; `kind` is "int", "float", "bool", "str" or "betas"."""
    bad = SchedulerConfigError(f"scheduler config: {key}={value!r} is not a valid {kind}"
                               + (f" (choose from {', '.join(choices)})" if choices else ""))
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind == "int":
        if not is_int(value):
            raise bad
    elif kind == "float":
        if not is_number(value):
            raise bad
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str) or (choices and value not in choices):
            raise bad
    elif kind == "optfloat":
        if value is not None:
            value = _check(key, value, "float")
    elif kind == "betas":
        if value is not None and not isinstance(value, (list, tuple, np.ndarray)):
            raise bad
    return value


class Scheduler:
    """Base class: config resolution and the common interface the denoising loop uses.

    Lifecycle: `set_timesteps(n)` then, for each `t` in `timesteps`:
    `x_in = scale_model_input(x, t)`, run the model on `x_in`, `x = step(model_output, t, x)`.
    A scheduler instance holds state (PNDM's history, Euler's step index): use one per batch.
    """

    name: ClassVar[str] = ""
    diffusers_class: ClassVar[str] = ""
    # key -> (diffusers' default for this class, kind, choices)
    SCHEMA: ClassVar[dict[str, tuple[Any, str, tuple | None]]] = {}
    # key -> values this port does not implement (key, predicate, message)
    UNSUPPORTED: ClassVar[tuple[tuple[str, Any, str], ...]] = ()

    def __init__(self, **config: Any):
        self.config, self.ignored_keys = self._resolve(config)
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray = np.zeros(0, dtype=np.int64)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Scheduler:
        """Build from a diffusers scheduler config dict (e.g. the parsed scheduler_config.json)."""
        if not isinstance(config, dict):
            raise SchedulerConfigError(f"scheduler config must be a JSON object, got {type(config).__name__}")
        return cls(**config)

    @classmethod
    def _resolve(cls, config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        resolved, ignored = {}, []
        used_defaults = config.get("_use_default_values") or ()
        if not isinstance(used_defaults, (list, tuple)):
            raise SchedulerConfigError(f"scheduler config: _use_default_values={used_defaults!r} is not a list")
        config = {k: v for k, v in config.items() if k not in used_defaults}
        for key, value in config.items():
            if key in cls.SCHEMA:
                _, kind, choices = cls.SCHEMA[key]
                resolved[key] = _check(key, value, kind, choices)
            else:
                ignored.append(key)
        for key, (default, _, _) in cls.SCHEMA.items():
            resolved.setdefault(key, default)
        for key, unsupported, message in cls.UNSUPPORTED:
            if unsupported(resolved[key]):
                raise SchedulerConfigError(f"scheduler config: {key}={resolved[key]!r}: {message}")
        if resolved["num_train_timesteps"] < 1:
            raise SchedulerConfigError("scheduler config: num_train_timesteps must be >= 1")
        if resolved.get("steps_offset", 0) < 0:
            raise SchedulerConfigError("scheduler config: steps_offset must be >= 0")
        return resolved, ignored

    # -- interface ---------------------------------------------------------------------------
    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: latents = noise * init_noise_sigma."""
        return 1.0

    def _check_steps(self, num_inference_steps: int) -> None:
        if not is_int(num_inference_steps):
            raise SchedulerConfigError(f"steps must be an integer, got {num_inference_steps!r}")
        n_train = self.config["num_train_timesteps"]
        if not 1 <= num_inference_steps <= n_train or self._largest_timestep(num_inference_steps) >= n_train:
            raise SchedulerConfigError(
                f"steps must be between 1 and {self.max_inference_steps()}, got {num_inference_steps}")

    def _largest_timestep(self, steps: int) -> int:
        """The largest training timestep `set_timesteps(steps)` would visit (must stay < num_train_timesteps)."""
        c = self.config
        if c.get("timestep_spacing") == "leading":  # diffusers' formula overflows when steps_offset > 0
            return (steps - 1) * (c["num_train_timesteps"] // steps) + c["steps_offset"]
        return c["num_train_timesteps"] - 1

    def max_inference_steps(self) -> int:
        """The most steps this configuration can take (num_train_timesteps, less where "leading" spacing
        with steps_offset would index past the last training timestep, e.g. 999 of 1000 for SD's config)."""
        n_train = self.config["num_train_timesteps"]
        return next((n for n in range(n_train, 0, -1) if self._largest_timestep(n) < n_train), 1)

    def set_timesteps(self, num_inference_steps: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """Input scaling some samplers need before the model call (identity for DDIM and PNDM)."""
        return sample

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        """One denoising step: returns the previous (less noisy) sample, float32, same shape."""
        raise NotImplementedError

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise SchedulerConfigError(f"{type(self).__name__}: call set_timesteps() before step()")


def spaced_timesteps(spacing: str, n_train: int, steps: int, steps_offset: int) -> np.ndarray:
    """The int64 timesteps, descending, for DDIM-style `timestep_spacing` (diffusers' formulas)."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        step_ratio = n_train // steps
        ts = (np.arange(0, steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        return ts + steps_offset
    return trailing_timesteps(n_train, steps)


def trailing_timesteps(n_train: int, steps: int) -> np.ndarray:
    """diffusers' "trailing" values, n_train - k * n_train/steps rounded, minus 1, for k < steps, descending.
    diffusers writes np.arange(n_train, 0, -ratio), which for some step counts (961 of 1000, ...) yields one
    element too many through float error: a timestep -1, which indexes the last alpha. Ours has `steps`."""
    return np.round(n_train - np.arange(steps) * (n_train / steps)).astype(np.int64) - 1


COMMON_SCHEMA: dict[str, tuple[Any, str, tuple | None]] = {
    "num_train_timesteps": (1000, "int", None),
    "beta_start": (0.0001, "float", None),
    "beta_end": (0.02, "float", None),
    "beta_schedule": ("linear", "str", BETA_SCHEDULES),
    "trained_betas": (None, "betas", None),
    "timestep_spacing": ("leading", "str", TIMESTEP_SPACINGS),
    "steps_offset": (0, "int", None),
}
