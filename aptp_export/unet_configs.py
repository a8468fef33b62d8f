"""UNet configurations as plain dicts: reading a model's config, building a UNet from one (on the meta device
when only the structure is needed), and the reference Stable Diffusion 2.1 UNet architecture.

A UNet's *config* (diffusers' `unet.config` without the private `_…` keys, tuples as lists) is what the
architecture space, expert files and export code pass around; the weights travel separately as safetensors.
"""

from __future__ import annotations

import json

import torch
from diffusers import UNet2DConditionModel

# Stable Diffusion 2.1 (768 px, v-prediction) UNet: 865.9 M parameters, latent 96x96x4, OpenCLIP-H text (1024-d).
# Values as in stabilityai/stable-diffusion-2-1/unet/config.json; the remaining keys are diffusers' defaults.
SD21_UNET_CONFIG: dict = {
    "sample_size": 96,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],  # diffusers' naming: number of heads per block (head dim 64)
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}


def clean_config(config) -> dict:
    """A JSON-able copy of a diffusers config (FrozenDict or dict): private `_…` keys dropped, tuples as lists."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def config_key(config) -> str:
    """A canonical string identifying a UNet structure (same key -> same modules and shapes)."""
    return json.dumps(clean_config(config), sort_keys=True)


def build_unet(config: dict, device: str | None = "meta"):
    """A `UNet2DConditionModel` built from `config`; on the meta device (no memory, no init time) by default."""

    if device is None:
        return UNet2DConditionModel.from_config(dict(config))
    with torch.device(device):
        return UNet2DConditionModel.from_config(dict(config))


def unwrap_unet(unet):
    """The UNet2DConditionModel inside DistributedDataParallel / accelerate / torch.compile wrappers."""
    seen = 0
    while seen < 8 and not is_unet(unet):
        inner = getattr(unet, "module", None)
        if inner is None:
            inner = getattr(unet, "_orig_mod", None)
        if inner is None:
            break
        unet, seen = inner, seen + 1
    return unet


def is_unet(m) -> bool:
    return isinstance(m, UNet2DConditionModel)
