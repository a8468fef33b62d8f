"""From final latents to PIL images.

Pixel-space models: image = clip((x + 1) / 2, 0, 1). Latent models: x / scaling_factor (+ shift_factor, SD3) goes
through the VAE decoder graph, whose output in [-1, 1] is mapped the same way (diffusers'
`VaeImageProcessor` "pil" path). Quantisation is diffusers' too: round(image * 255) as uint8.
"""

from __future__ import annotations

import numpy as np

from .install import install_hint

from .errors import BackendError
from .manifest import VAE_DECODER_INPUTS, VAE_DECODER_OUTPUTS
from .backends import Session


def decode(latents: np.ndarray, vae_decoder: Session | None = None, scaling_factor: float = 1.0,
           shift_factor: float = 0.0) -> np.ndarray:
    """Images [B, 3, H, W] float32 in [0, 1] from latents [B, C, h, w]; the decoder reads latents / scaling_factor
    + shift_factor (SD3's VAE has a shift, the others none), as diffusers' pipelines compute it."""
    x = latents
    if vae_decoder is not None:
        z = x / np.float32(scaling_factor)
        if shift_factor:
            z = z + np.float32(shift_factor)
        x = vae_decoder.run({VAE_DECODER_INPUTS[0]: z.astype(np.float32)})
        x = x[VAE_DECODER_OUTPUTS[0]]
    return np.clip(x / 2 + 0.5, 0.0, 1.0).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> [B, H, W, C] uint8."""
    return (images.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def to_pil(images: np.ndarray) -> list:
    """PIL images (RGB, or L for one channel) from [B, C, H, W] floats in [0, 1]."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise BackendError(f'the runtime needs pillow: {install_hint("cpu")}') from e
    arr = to_uint8(images)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0]) for a in arr]
    return [Image.fromarray(a) for a in arr]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
