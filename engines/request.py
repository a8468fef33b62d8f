"""The request model: what one generation asks for, validated once.

`GenerationParams` is taken by `Runtime.generate`, by the server's batcher and by the HTTP parser alike;
a new generation parameter is one field here, its check in `__post_init__`, and its use in the step
function (engines/stepping.py). Errors are `ParamError`s whose `param` names the request field.

    p = GenerationParams(steps=25, guidance_scale=7.5, guidance_rescale=0.7, seed=3, scheduler="euler")
    p.seeds(2)                  # [3, 4]: per-image seeds
    p.scheduler_or("ddim")      # "euler": the request's scheduler, else the export's
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ParamError, SchedulerConfigError
from .schedulers import scheduler_name
from .validation import is_int, is_number

SEED_MAX = 2**63 - 1
MAX_GUIDANCE_SCALE = 100.0


@dataclass(frozen=True)
class GenerationParams:
    """Sampler settings of one request.

    steps: inference steps (>= 1); guidance_scale: classifier-free guidance weight in [0, 100] (<= 1 turns
    guidance off, as in diffusers); guidance_rescale: in [0, 1], diffusers' `rescale_noise_cfg` (Lin et al.
    2023, section 3.4; useful for v-prediction models), applied only with guidance; seed: int s (image i
    uses s + i) or one int per image; scheduler: "ddim" | "pndm" | "euler" | "flow_euler" (or a diffusers
    class name), None for the export's.
    """

    steps: int = 25
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    seed: int | tuple[int, ...] = 0
    scheduler: str | None = None

    def __post_init__(self):
        if not is_int(self.steps) or self.steps < 1:
            raise ParamError(f"steps must be a positive integer, got {self.steps!r}", "steps")
        for name, hi in (("guidance_scale", MAX_GUIDANCE_SCALE), ("guidance_rescale", 1.0)):
            v = getattr(self, name)
            if not is_number(v) or not 0 <= v <= hi:
                raise ParamError(f"{name} must be a number from 0 to {hi:g}, got {v!r}", name)
        if is_int(self.seed):
            if not 0 <= self.seed <= SEED_MAX:
                raise ParamError(f"seed is {self.seed}; seeds must be in [0, 2**63 - 1]", "seed")
        elif isinstance(self.seed, (list, tuple)):
            for i, s in enumerate(self.seed):
                if not is_int(s) or not 0 <= s <= SEED_MAX:
                    raise ParamError(f"seed[{i}]: expected an integer in [0, 2**63 - 1], got {s!r}", "seed")
        else:
            raise ParamError(f"seed must be an int or a list of ints, got {type(self.seed).__name__}", "seed")
        if self.scheduler is not None:
            try:
                name = scheduler_name(self.scheduler)
            except SchedulerConfigError as e:
                raise ParamError(str(e), "scheduler") from None
            object.__setattr__(self, "scheduler", name)
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        object.__setattr__(self, "guidance_rescale", float(self.guidance_rescale))
        object.__setattr__(self, "seed", int(self.seed) if is_int(self.seed) else tuple(int(s) for s in self.seed))

    @property
    def cfg(self) -> bool:
        """Whether classifier-free guidance runs (the UNet then sees an unconditional row per image)."""
        return self.guidance_scale > 1.0

    def seeds(self, n: int) -> list[int]:
        """Per-image seeds for `n` images: seed + i, or the list (which must have n entries)."""
        if isinstance(self.seed, tuple):
            if len(self.seed) != n:
                raise ParamError(f"seed: {len(self.seed)} seeds given, {n} needed (one per image)", "seed")
            return list(self.seed)
        if self.seed + n - 1 > SEED_MAX:
            raise ParamError(f"seed {self.seed} + {n} images passes 2**63 - 1", "seed")
        return [self.seed + i for i in range(n)]

    def scheduler_or(self, default: str) -> str:
        """The scheduler to use: the request's, else `default` (the export's), normalised."""
        return self.scheduler if self.scheduler is not None else scheduler_name(default)

    def within(self, max_steps: int) -> GenerationParams:
        """Self, if a server's limit allows it (ParamError naming `steps` otherwise)."""
        if self.steps > max_steps:
            raise ParamError(f"steps must be an integer from 1 to {max_steps}, got {self.steps}", "steps")
        return self
