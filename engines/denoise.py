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

import numpy as np

from .errors import EngineError
from .manifest import UNET_INPUTS, UNET_OUTPUTS
from .schedulers import Scheduler
from .sessions import Session

SEED_MAX = 2**63 - 1
DEFAULT_BATCH_SIZE = 8  # prompts per UNet call of Runtime.generate; export profiles are tuned for it


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


def denoise(unet: Session, scheduler: Scheduler, noise: np.ndarray, cond: np.ndarray, uncond: np.ndarray,
            steps: int, guidance_scale: float, progress=None) -> np.ndarray:
    """Run the sampler; returns the final latents [B, C, H, W] float32.

    Args:
        unet: session with inputs (sample, timestep, encoder_hidden_states) -> out_sample.
        scheduler: a fresh scheduler (its state is per batch).
        noise: [B, C, H, W] unscaled initial noise (`initial_noise`).
        cond: [B, L, E] text context of the prompts; uncond: [1, L, E] context of "".
        steps: number of inference steps; guidance_scale: CFG weight (<= 1 disables CFG).
        progress: optional callable(step_index, total) called after each model call.
    """
    scheduler.set_timesteps(steps)
    latents = (noise * scheduler.init_noise_sigma).astype(np.float32)
    b = latents.shape[0]
    cfg = unet_batch(1, guidance_scale) == 2
    context = np.concatenate([np.repeat(uncond, b, axis=0), cond]) if cfg else cond
    context = context.astype(np.float32, copy=context is cond)  # our own array, never the caller's
    context.setflags(write=False)  # the same every step: a GPU session may keep it on the device
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        model_in = np.concatenate([latents, latents]) if cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        timestep = np.full((model_in.shape[0],), t, dtype=np.float32)
        out = unet.run({UNET_INPUTS[0]: model_in, UNET_INPUTS[1]: timestep, UNET_INPUTS[2]: context})
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
