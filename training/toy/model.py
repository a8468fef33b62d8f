"""The toy teacher's architecture and noise schedule (shared constants; the shipped teacher uses exactly these)."""

from __future__ import annotations

TEXT_LEN = 16

UNET_CONFIG: dict = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 384,
    "attention_head_dim": (4, 4, 8),  # diffusers' naming: number of heads per block (head dim 16)
    "norm_num_groups": 16,
    "use_linear_projection": True,
}

# Pixel-space DDPM: cosine schedule (squaredcos_cap_v2), epsilon prediction, x0 clipped to [-1, 1].
# "trailing" spacing makes a 25-step DDIM run start at t = 999 (pure noise), as training ends there.
SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}


def make_unet(seed: int = 0):
    """A freshly initialised toy UNet2DConditionModel (deterministic for `seed`)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def make_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)
