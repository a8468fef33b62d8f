"""numpy ports of diffusers' DDIM, PNDM, Euler and flow-matching Euler schedulers, built from the same
config JSON.

`make_scheduler(name, config)` with name "ddim" | "pndm" | "euler" | "flow_euler" (or a diffusers class
name such as "PNDMScheduler" or "FlowMatchEulerDiscreteScheduler") returns a fresh scheduler;
schedulers hold per-run state, so make one per batch. A flow-matching sampler on a config written for
DDPM noise (or the reverse) is refused: the model predicts a different quantity, and the images would be
noise without an error.
"""

from __future__ import annotations

from typing import Any

from ..errors import SchedulerConfigError
from ._common import Scheduler
from .ddim import DDIMScheduler
from .euler import EulerDiscreteScheduler
from .flow_euler import FlowMatchEulerScheduler
from .pndm import PNDMScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "flow_euler": FlowMatchEulerScheduler,
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


_FLOW_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "shift_terminal")
_DDPM_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def config_family(config: dict[str, Any]) -> str | None:
    """"flow" for a flow-matching scheduler config (SD3, Flux; or a DDPM-family class run on flow sigmas),
    "ddpm" for a noise-schedule config (SD 1.x/2.x, SDXL, PixArt), None when the config names neither. The
    class name decides first, then a beta schedule: other schedulers share key names with FlowMatchEuler
    (DPM-Solver has `use_dynamic_shifting`, `flow_shift`)."""
    cls = str(config.get("_class_name", ""))
    if cls.startswith("FlowMatch") or config.get("prediction_type") == "flow_prediction" \
            or config.get("use_flow_sigmas") is True:
        return "flow"
    if cls or any(k in config for k in _DDPM_KEYS):  # flow-matching configs have no beta schedule
        return "ddpm"
    if any(k in config for k in _FLOW_KEYS):
        return "flow"
    return None


def default_sampler(config: dict[str, Any]) -> str:
    """The sampler an export records when none is asked for: "flow_euler" for a flow-matching config (SD3),
    "ddim" otherwise."""
    return "flow_euler" if config_family(config) == "flow" else "ddim"


def make_scheduler(name: str, config: dict[str, Any], mu: float | None = None) -> Scheduler:
    """A new scheduler of kind `name` from a diffusers scheduler config dict. `mu`: the resolution shift a
    flow_euler scheduler with use_dynamic_shifting uses when `set_timesteps` is given none (an export's
    `scheduler.mu`); the other samplers have no such shift and ignore it."""
    key = scheduler_name(name)
    family = config_family(config) if isinstance(config, dict) else None
    wants = "flow" if key == "flow_euler" else "ddpm"
    if family is not None and family != wants:
        cls = config.get("_class_name") or ("a flow-matching config" if family == "flow" else "a DDPM config")
        raise SchedulerConfigError(
            f"scheduler {name!r} is a {'flow-matching' if wants == 'flow' else 'DDPM-noise'} sampler but the "
            f"export's scheduler is {cls}: its model predicts "
            f"{'a velocity' if family == 'flow' else 'noise'}; choose from "
            f"{', '.join(k for k in SCHEDULERS if (k == 'flow_euler') == (family == 'flow'))}")
    scheduler = SCHEDULERS[key].from_config(config)
    if mu is not None and isinstance(scheduler, FlowMatchEulerScheduler):
        scheduler.mu = float(mu)
    return scheduler


__all__ = ["Scheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerScheduler",
           "SCHEDULERS", "config_family", "default_sampler", "make_scheduler", "scheduler_name"]
