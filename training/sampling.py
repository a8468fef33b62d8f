"""The torch sampling path: classifier-free guided denoising of a (possibly gated or pruned) UNet.

Initial noise, exactly reproducible without torch: prompt i of a call with `seed` starts from
    np.random.default_rng(seed + i).standard_normal((C, H, W), dtype=np.float32)
multiplied by `scheduler.init_noise_sigma` (1.0 for DDIM). The runtime in engines/ draws the same noise.

Classifier-free guidance runs the unconditional ("") and conditional contexts in one batch
[uncond_0..uncond_{B-1}, cond_0..cond_{B-1}], eps = eps_u + guidance_scale * (eps_c - eps_u) (the runtime's
`engines.stepping.guide`, one implementation for numpy and torch).
Output: pixel space, x in [-1, 1] -> clamp((x + 1) / 2, 0, 1) -> round(255 *) as uint8 [B, H, W, 3].
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler
from tqdm import tqdm

from engines.stepping import guide


def initial_noise(seed: int, n: int, channels: int = 3, height: int = 32, width: int = 32) -> np.ndarray:
    """float32 [n, C, H, W]; row i = np.random.default_rng(seed + i).standard_normal((C, H, W))."""
    return np.stack([np.random.default_rng(seed + i).standard_normal((channels, height, width), dtype=np.float32)
                     for i in range(n)]) if n else np.zeros((0, channels, height, width), np.float32)


def make_scheduler(config, kind: str = "ddim"):
    """A diffusers scheduler from a config dict or a scheduler directory. kind: "ddim" | "ddpm" | "euler" | "pndm"."""

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler, "pndm": PNDMScheduler}
    if kind not in classes:
        raise ValueError(f"unknown scheduler kind {kind!r}; choose one of {sorted(classes)}")
    if not isinstance(config, dict):
        config = DDPMScheduler.load_config(str(config))
    return classes[kind].from_config(config)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C]."""
    x = ((x.float() + 1) / 2).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(unet, captions: list[str], *, text_encoder, scheduler, steps: int = 25, guidance_scale: float = 7.5,
           seed: int = 0, height: int = 32, width: int = 32, batch_size: int | None = None,
           progress: bool = False, guidance_rescale: float = 0.0) -> np.ndarray:
    """Generate one image per caption. Returns uint8 [B, height, width, 3].

    unet: any module called as unet(x [2B, C, H, W], t, encoder_hidden_states=[2B, L, D]).sample
    (dense, gated inside `space.gated(...)`, or a materialised expert). text_encoder: a
    training.text.TextEncoder. scheduler: a diffusers scheduler (DDIM recommended; it is reconfigured by
    set_timesteps). batch_size: prompts per UNet call (None = all at once); results do not depend on it.
    The guidance step is the runtime's (`engines.stepping.guide`, with optional `guidance_rescale`).
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a list of str")
    captions = list(captions)
    if steps < 1:
        raise ValueError("steps must be >= 1")
    n = len(captions)
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    channels = int(unet.config.in_channels) if hasattr(unet, "config") else 3
    noise = torch.from_numpy(initial_noise(seed, n, channels, height, width))
    cond_all = text_encoder.token_states(captions)
    uncond_one = text_encoder.token_states([""])
    out = []
    bs = batch_size or max(n, 1)

    for s in range(0, n, bs):
        x = noise[s:s + bs].to(device=device, dtype=torch.float32) * float(scheduler.init_noise_sigma)
        b = x.shape[0]
        ctx = torch.cat([uncond_one.expand(b, -1, -1), cond_all[s:s + bs]]).to(device=device, dtype=dtype)
        scheduler.set_timesteps(steps)
        for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
            inp = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps = unet(inp.to(dtype), t, encoder_hidden_states=ctx).sample.float()
            eps = guide(*eps.chunk(2), guidance_scale, guidance_rescale)
            x = scheduler.step(eps, t, x).prev_sample
        out.append(to_uint8(x))
    return np.concatenate(out) if out else np.zeros((0, height, width, 3), np.uint8)
