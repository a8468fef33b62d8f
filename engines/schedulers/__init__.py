"""numpy ports of diffusers' DDIM, PNDM and Euler schedulers, built from the same config JSON.

`make_scheduler(name, config)` with name "ddim" | "pndm" | "euler" (or a diffusers class name such
as "PNDMScheduler") returns a fresh scheduler; schedulers hold per-run state, so make one per batch.
"""

from __future__ import annotations

from typing import Any

from ..errors import SchedulerConfigError
from ._common import Scheduler
from .ddim import DDIMScheduler
from .euler import EulerDiscreteScheduler
from .pndm import PNDMScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
}
_BY_CLASS = {cls.diffusers_class: name for name, cls in SCHEDULERS.items()}


def scheduler_name(name: str) -> str:
    """Normalise "ddim" / "DDIMScheduler" / "PNDM" to a key of SCHEDULERS, or raise naming the choices."""
    if isinstance(name, str):
        if name in _BY_CLASS:
            return _BY_CLASS[name]
        if name.lower() in SCHEDULERS:
            return name.lower()
    raise SchedulerConfigError(f"unknown scheduler {name!r} (choose from {', '.join(SCHEDULERS)})")


def make_scheduler(name: str, config: dict[str, Any]) -> Scheduler:
    """A new scheduler of kind `name` from a diffusers scheduler config dict."""
    return SCHEDULERS[scheduler_name(name)].from_config(config)


__all__ = ["Scheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "SCHEDULERS",
           "make_scheduler", "scheduler_name"]
