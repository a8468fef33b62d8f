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
batch [uncond; cond] of 2B samples and the prediction is `u + g (c - u)` (optionally rescaled,
engines.stepping.guide); with guidance_scale <= 1 (no guidance, as in diffusers) it sees only the B
conditional samples. The loop is `engines.stepping.unet_step` over one state, the step the server uses. The UNet timestep input is a
float32 vector [N] (fractional for Euler).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .conditioning import TextCondition
from .errors import EngineError
from .request import SEED_MAX, GenerationParams
from .schedulers import Scheduler
from .backends import Session
from .stepping import ImageState, unet_step

__all__ = ["DEFAULT_BATCH_SIZE", "SEED_MAX", "TextCondition", "denoise", "initial_noise", "unet_batch"]
DEFAULT_BATCH_SIZE = 8  # prompts per UNet call of Runtime.generate; export profiles are tuned for it


def unet_batch(prompts: int, guidance_scale: float) -> int:
    """UNet batch of a call for `prompts` prompts: twice that with classifier-free guidance."""
    return 2 * prompts if guidance_scale > 1.0 else prompts


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """Unscaled starting noise [B, C, H, W] float32, one independent generator per seed."""
    return np.stack([np.random.default_rng(s).standard_normal(shape, dtype=np.float32) for s in seeds])


def denoise(unet: Session, scheduler: Scheduler, noise: np.ndarray, cond, uncond, params: GenerationParams,
            progress=None) -> np.ndarray:
    """Run the sampler; returns the final latents [B, C, H, W] float32.

    Args:
        unet: session with inputs (sample, timestep, encoder_hidden_states[, the family's extra inputs: SDXL's
            text_embeds and time_ids, PixArt's encoder_attention_mask, SD3's pooled_projections]) -> out_sample.
        scheduler: a fresh scheduler (its state is per batch).
        noise: [B, C, H, W] unscaled initial noise (`initial_noise`).
        cond: TextCondition (or context array [B, L, E]) of the prompts; uncond: the same for the
            unconditional prompt, one row.
        params: steps, guidance_scale (<= 1 disables CFG), guidance_rescale (engines.stepping.guide); the
            seeds are in `noise`.
        progress: optional callable(step_index, total) called after each model call.
    """
    state = ImageState(noise, cond, uncond, scheduler, params)
    while not state.done:
        unet_step(unet, [state])
        if progress is not None:
            progress(state.index - 1, state.total)
    if not state.finite():
        raise EngineError("the denoising loop produced non-finite values (NaN/inf): the expert graph or "
                          "its precision is broken for these inputs")
    return state.latents
