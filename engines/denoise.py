"""The denoising loop with classifier-free guidance, in numpy around a UNet session.

Initial noise (the contract shared with the torch sampling path, training/sampling.py):

    noise_i = np.random.default_rng(seed_i).standard_normal((C, H, W), dtype=np.float32)
    latents = stack(noise_i) * scheduler.init_noise_sigma

with `seed_i = seed + i` for an int `seed` and prompt index `i` in the caller's list, or
`seed_i = seeds[i]` for a list. Each image therefore depends only on its prompt, its seed, the
expert and the sampler settings, never on which other prompts share its batch. A torch
implementation that wants the same images builds the same numpy noise and converts it with
`torch.from_numpy` (never `torch.randn`).

The loop is diffusers' StableDiffusionPipeline loop: with guidance_scale > 1 the UNet sees one
batch [uncond; cond] of 2B samples and the prediction is `u + g (c - u)`; with guidance_scale <= 1
(no guidance, as in diffusers) it sees only the B conditional samples. The UNet timestep input is a
float32 vector [N] (fractional for Euler).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import EngineError
from .manifest import UNET_INPUTS, UNET_OUTPUTS
from .schedulers import Scheduler
from .sessions import Session

SEED_MAX = 2**63 - 1
DEFAULT_BATCH_SIZE = 8  # prompts per UNet call of Runtime.generate; export profiles are tuned for it


@dataclass(frozen=True)
class TextCondition:
    """What the UNet reads about the prompts, row by row: the text context [B, L, E] and, for SDXL-class
    UNets, the extra inputs `added` (name -> [B, ...]: text_embeds [B, P], the pooled text embedding, and
    time_ids [B, 6], the size conditioning). A bare context array is a TextCondition without extras."""

    context: np.ndarray
    added: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, value) -> TextCondition:
        if isinstance(value, TextCondition):
            return value
        return cls(np.asarray(value, dtype=np.float32))

    def __len__(self) -> int:
        return int(self.context.shape[0])

    def take(self, rows) -> TextCondition:
        """The rows `rows` (indices or a slice) of every array."""
        return TextCondition(self.context[rows], {k: v[rows] for k, v in self.added.items()})

    def repeat(self, n: int) -> TextCondition:
        """Each row repeated n times (a [1, ...] unconditional condition for a batch of n)."""
        return TextCondition(np.repeat(self.context, n, axis=0), {k: np.repeat(v, n, axis=0)
                                                                  for k, v in self.added.items()})

    @staticmethod
    def concat(items: Sequence[TextCondition]) -> TextCondition:
        keys = set(items[0].added)
        if any(set(c.added) != keys for c in items):
            raise EngineError("text conditions with different UNet inputs cannot share a batch (an SDXL export "
                              "needs Runtime.condition's TextCondition, not a bare text context)")
        return TextCondition(np.concatenate([c.context for c in items]).astype(np.float32, copy=False),
                             {k: np.concatenate([c.added[k] for c in items]).astype(np.float32, copy=False)
                              for k in sorted(keys)})

    def feeds(self) -> dict[str, np.ndarray]:
        """The UNet inputs besides sample and timestep."""
        return {UNET_INPUTS[2]: self.context, **self.added}


def unet_batch(prompts: int, guidance_scale: float) -> int:
    """UNet batch of a call for `prompts` prompts: twice that with classifier-free guidance."""
    return 2 * prompts if guidance_scale > 1.0 else prompts


def resolve_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """Per-prompt seeds: `seed + i` for an int, or the list itself (one non-negative int per prompt)."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        seeds = [int(seed) + i for i in range(n)]
    elif isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise EngineError(f"seed: {len(seed)} seeds given for {n} prompts")
        for i, s in enumerate(seed):
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
                raise EngineError(f"seed[{i}]: expected an integer, got {s!r}")
        seeds = [int(s) for s in seed]
    else:
        raise EngineError(f"seed must be an int or a list of ints, got {type(seed).__name__}")
    for i, s in enumerate(seeds):
        if not 0 <= s <= SEED_MAX:
            raise EngineError(f"seed for prompt {i} is {s}; seeds must be in [0, 2**63 - 1]")
    return seeds


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """Unscaled starting noise [B, C, H, W] float32, one independent generator per seed."""
    return np.stack([np.random.default_rng(s).standard_normal(shape, dtype=np.float32) for s in seeds])


def denoise(unet: Session, scheduler: Scheduler, noise: np.ndarray, cond, uncond,
            steps: int, guidance_scale: float, progress=None) -> np.ndarray:
    """Run the sampler; returns the final latents [B, C, H, W] float32.

    Args:
        unet: session with inputs (sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> out_sample.
        scheduler: a fresh scheduler (its state is per batch).
        noise: [B, C, H, W] unscaled initial noise (`initial_noise`).
        cond: TextCondition (or context array [B, L, E]) of the prompts; uncond: the same for the
            unconditional prompt, one row.
        steps: number of inference steps; guidance_scale: CFG weight (<= 1 disables CFG).
        progress: optional callable(step_index, total) called after each model call.
    """
    scheduler.set_timesteps(steps)
    latents = (noise * scheduler.init_noise_sigma).astype(np.float32)
    b = latents.shape[0]
    cfg = unet_batch(1, guidance_scale) == 2
    cond, uncond = TextCondition.of(cond), TextCondition.of(uncond)
    condition = TextCondition.concat([uncond.repeat(b), cond]) if cfg else TextCondition.concat([cond])
    feeds = condition.feeds()  # our own arrays (concat copies), never the caller's
    for v in feeds.values():
        v.setflags(write=False)  # the same every step: a GPU session may keep them on the device
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        model_in = np.concatenate([latents, latents]) if cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        timestep = np.full((model_in.shape[0],), t, dtype=np.float32)
        out = unet.run({UNET_INPUTS[0]: model_in, UNET_INPUTS[1]: timestep, **feeds})
        pred = out[UNET_OUTPUTS[0]]
        if cfg:
            pred_uncond, pred_cond = pred[:b], pred[b:]
            pred = pred_uncond + np.float32(guidance_scale) * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents)
        if progress is not None:
            progress(i, total)
    if not np.isfinite(latents).all():
        raise EngineError("the denoising loop produced non-finite values (NaN/inf): the expert graph or "
                          "its precision is broken for these inputs")
    return latents
