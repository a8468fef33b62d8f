"""Flow-matching Euler (rectified flow, SD3 / Flux): a port of diffusers' `FlowMatchEulerDiscreteScheduler`.

The model predicts a velocity v and the step is `x_next = x + (sigma_next - sigma) * v`; the noisy
sample at noise level sigma is `sigma * noise + (1 - sigma) * x0` (`scale_noise`). The model input
is not scaled (`scale_model_input` is the identity), `init_noise_sigma` is 1, and the timesteps are
float32 `sigma * num_train_timesteps`, fractional: the transformer graph takes a float timestep.

Supported: a static `shift` (SD3: 3.0), resolution-dependent shifting (`use_dynamic_shifting`, with
`mu` given to `set_timesteps`, "exponential" or "linear" `time_shift_type`; `calculate_shift` gives
the pipelines' mu for an image sequence length), `shift_terminal`, Karras and exponential sigmas,
`invert_sigmas`, `set_begin_index` (img2img). Not ported: beta sigmas (need scipy),
`stochastic_sampling`, per-token timesteps, custom `sigmas`/`timesteps` lists for `set_timesteps`.

Arithmetic follows diffusers' dtypes: the training sigmas are float32, the inference schedule is
computed in float64 (numpy, as diffusers does) and rounded to float32, timesteps are float32
`sigmas * num_train_timesteps`. Like diffusers, the static shift is applied to the training sigmas
and again to the inference schedule, whose last point is therefore shift(shift(1 / N)).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import SchedulerConfigError
from ..validation import is_int, is_number
from ._common import Scheduler


class FlowMatchEulerScheduler(Scheduler):
    """Config keys and defaults as diffusers' FlowMatchEulerDiscreteScheduler (shift=1.0, no dynamic
    shifting, time_shift_type="exponential")."""

    name = "flow_euler"
    diffusers_class = "FlowMatchEulerDiscreteScheduler"
    SCHEMA = {
        "num_train_timesteps": (1000, "int", None),
        "shift": (1.0, "float", None),
        "use_dynamic_shifting": (False, "bool", None),
        "base_shift": (0.5, "optfloat", None),
        "max_shift": (1.15, "optfloat", None),
        "base_image_seq_len": (256, "int", None),
        "max_image_seq_len": (4096, "int", None),
        "invert_sigmas": (False, "bool", None),
        "shift_terminal": (None, "optfloat", None),
        "use_karras_sigmas": (False, "bool", None),
        "use_exponential_sigmas": (False, "bool", None),
        "use_beta_sigmas": (False, "bool", None),
        "time_shift_type": ("exponential", "str", ("exponential", "linear")),
        "stochastic_sampling": (False, "bool", None),
    }
    UNSUPPORTED = (
        ("use_beta_sigmas", bool, "beta sigmas are not ported (they need scipy); use karras or exponential"),
        ("stochastic_sampling", bool, "stochastic sampling is not ported (the deterministic Euler step is)"),
    )

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        if c["use_karras_sigmas"] and c["use_exponential_sigmas"]:
            raise SchedulerConfigError(
                "scheduler config: use_karras_sigmas and use_exponential_sigmas are exclusive")
        if c["shift"] <= 0:
            raise SchedulerConfigError(f"scheduler config: shift={c['shift']!r} must be > 0")
        if c["shift_terminal"] is not None and not 0 <= c["shift_terminal"] < 1:
            raise SchedulerConfigError(
                f"scheduler config: shift_terminal={c['shift_terminal']!r} must be in [0, 1) "
                "(0 or null: off)")
        n = c["num_train_timesteps"]
        # the training schedule, float32 like diffusers' torch tensors
        timesteps = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
        sigmas = timesteps / np.float32(n)
        if not c["use_dynamic_shifting"]:  # with dynamic shifting, the shift is applied in set_timesteps
            sigmas = self._static_shift(sigmas)
        self.sigmas = sigmas.astype(np.float32)
        self.timesteps = (self.sigmas * np.float32(n)).astype(np.float32)
        self.sigma_min = float(self.sigmas[-1])
        self.sigma_max = float(self.sigmas[0])
        self._step_index: int | None = None
        self.mu: float | None = None  # set_timesteps' default mu (engines.schedulers.make_scheduler)
        self._begin_index: int | None = None

    def _static_shift(self, sigmas: np.ndarray) -> np.ndarray:
        """shift * s / (1 + (shift - 1) * s) in the dtype of `sigmas`; as in torch, `shift - 1` is a
        Python (float64) value rounded once to that dtype, not float32(shift) - 1 (they differ for 1.1)."""
        shift, as_dtype = self.config["shift"], sigmas.dtype.type
        return as_dtype(shift) * sigmas / (1 + as_dtype(shift - 1) * sigmas)

    @property
    def shift(self) -> float:
        return self.config["shift"]

    @property
    def step_index(self) -> int | None:
        """Index of the next step's sigma; None until the first `step` after set_timesteps."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the steps (and `scale_noise`) at this index of `timesteps`, as an img2img pipeline does
        after dropping the first timesteps; without it the first `step` finds its index from the timestep."""
        if not is_int(begin_index) or not 0 <= begin_index < len(self.timesteps):
            raise SchedulerConfigError(
                f"begin_index must be in 0..{len(self.timesteps) - 1}, got {begin_index!r}")
        self._begin_index = int(begin_index)

    def calculate_shift(self, image_seq_len: int) -> float:
        """The `mu` diffusers' SD3 / Flux pipelines pass for `image_seq_len` latent tokens: linear from
        base_shift at base_image_seq_len to max_shift at max_image_seq_len (their `calculate_shift`)."""
        c = self.config
        if c["base_shift"] is None or c["max_shift"] is None:
            raise SchedulerConfigError("scheduler config: base_shift and max_shift are needed to compute mu")
        if c["max_image_seq_len"] == c["base_image_seq_len"]:
            raise SchedulerConfigError("scheduler config: max_image_seq_len equals base_image_seq_len, "
                                       "so mu cannot be interpolated")
        m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
        b = c["base_shift"] - m * c["base_image_seq_len"]
        return image_seq_len * m + b

    def time_shift(self, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
        """Resolution-dependent shift of the sigmas `t` (diffusers' exponential or linear form)."""
        if self.config["time_shift_type"] == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def stretch_shift_to_terminal(self, t: np.ndarray) -> np.ndarray:
        """Stretch the schedule so that its last value is `shift_terminal` (LTX-Video)."""
        one_minus_z = 1 - t
        scale_factor = one_minus_z[-1] / (1 - self.config["shift_terminal"])
        return 1 - (one_minus_z / scale_factor)

    def set_timesteps(self, num_inference_steps: int, mu: float | None = None) -> None:
        """float32 sigmas (+ the final 0, or 1 with invert_sigmas) and timesteps = sigmas * N, descending.
        `mu` is required with `use_dynamic_shifting` (see `calculate_shift`; default: the `mu` attribute) and
        ignored otherwise."""
        self._check_steps(num_inference_steps)
        c = self.config
        mu = self.mu if mu is None else mu
        if c["use_dynamic_shifting"]:
            if mu is None:
                raise SchedulerConfigError(
                    "flow_euler: this scheduler config has use_dynamic_shifting, so set_timesteps needs `mu` "
                    "(e.g. calculate_shift(image_seq_len))")
            linear = c["time_shift_type"] == "linear"
            if not is_number(mu) or (linear and mu <= 0):
                need = "a finite number > 0 (linear time_shift_type)" if linear else "a finite number"
                raise SchedulerConfigError(f"flow_euler: mu must be {need}, got {mu!r}")
        n = int(num_inference_steps)
        if c["shift_terminal"] and n < 2:  # diffusers divides 0 by 0 here: a NaN sigma
            raise SchedulerConfigError("flow_euler: shift_terminal needs at least 2 steps")
        n_train = c["num_train_timesteps"]

        # float64 from here to the cast, as diffusers computes it in numpy
        timesteps = np.linspace(self.sigma_max * n_train, self.sigma_min * n_train, n)
        sigmas = timesteps / n_train
        if c["use_dynamic_shifting"]:
            sigmas = self.time_shift(float(mu), 1.0, sigmas)
        else:
            sigmas = self._static_shift(sigmas)
        if c["shift_terminal"]:
            sigmas = self.stretch_shift_to_terminal(sigmas)
        if c["use_karras_sigmas"]:
            sigmas = self._convert_to_karras(sigmas, n)
        elif c["use_exponential_sigmas"]:
            sigmas = self._convert_to_exponential(sigmas, n)

        sigmas = np.asarray(sigmas).astype(np.float32)
        if c["invert_sigmas"]:  # Mochi: inverted sigmas, timesteps from the inverted ones
            sigmas = np.float32(1.0) - sigmas
            last = np.ones(1, dtype=np.float32)
        else:
            last = np.zeros(1, dtype=np.float32)
        self.timesteps = (sigmas * np.float32(n_train)).astype(np.float32)
        self.sigmas = np.concatenate([sigmas, last]).astype(np.float32)
        self.num_inference_steps = n
        self._step_index = None
        self._begin_index = None

    @staticmethod
    def _convert_to_karras(in_sigmas: np.ndarray, n: int) -> np.ndarray:
        sigma_min, sigma_max = float(in_sigmas[-1]), float(in_sigmas[0])
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho

    @staticmethod
    def _convert_to_exponential(in_sigmas: np.ndarray, n: int) -> np.ndarray:
        sigma_min, sigma_max = float(in_sigmas[-1]), float(in_sigmas[0])
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))

    def index_for_timestep(self, timestep, schedule_timesteps: np.ndarray | None = None) -> int:
        """Index of `timestep` in the schedule (exact float32 match); the second one where it occurs
        twice, as diffusers does, so that a schedule entered mid-way does not skip a sigma."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = np.flatnonzero(schedule == np.float32(timestep))
        if len(indices) == 0:
            raise ValueError(
                f"flow_euler: timestep {float(timestep)!r} is not one of this schedule's timesteps")
        return int(indices[1 if len(indices) > 1 else 0])

    def scale_noise(self, sample: np.ndarray, timestep, noise: np.ndarray) -> np.ndarray:
        """The forward process: sigma * noise + (1 - sigma) * sample, float32, sigma per sample taken
        from the schedule at `timestep` (a scalar or one per sample); at `begin_index` (or the current
        step) when one is set, as diffusers does for img2img / inpainting."""
        ts = np.atleast_1d(np.asarray(timestep))
        if self._begin_index is None:
            idx = [self.index_for_timestep(t) for t in ts]
        elif self._step_index is not None:
            idx = [self._step_index] * ts.shape[0]
        else:
            idx = [self._begin_index] * ts.shape[0]
        sample = np.asarray(sample, dtype=np.float32)
        sigma = self.sigmas[idx].reshape(-1, *([1] * (sample.ndim - 1)))
        noise = np.asarray(noise, dtype=np.float32)
        return (sigma * noise + (np.float32(1.0) - sigma) * sample).astype(np.float32, copy=False)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        """Euler step sigma_i -> sigma_{i+1} with the predicted velocity `model_output`. The first call
        finds i from `timestep` (or `begin_index`); later calls advance one step each, as diffusers does."""
        self._require_timesteps()
        if is_int(timestep):
            raise ValueError("flow_euler: pass one of scheduler.timesteps (a float) as timestep, "
                             "not an integer index")
        if self._step_index is None:
            begin = self._begin_index
            self._step_index = self.index_for_timestep(timestep) if begin is None else begin
        i = self._step_index
        if i >= len(self.timesteps):
            raise RuntimeError("flow_euler: more steps than timesteps; call set_timesteps() again")
        sample = np.asarray(sample, dtype=np.float32)
        dt = self.sigmas[i + 1] - self.sigmas[i]
        self._step_index += 1
        return (sample + dt * np.asarray(model_output, dtype=np.float32)).astype(np.float32, copy=False)
