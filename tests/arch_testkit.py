"""Small UNet configurations, weight randomisation and architecture-vector suites for the tests/test_arch_*.py."""

from __future__ import annotations

import numpy as np
import torch

from aptp_export.unet_configs import added_cond_kwargs

# The toy teacher (common brief), SD-2-like, 3 levels, GroupNorm 16, per-block heads, linear projections.
TOY = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 128), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=384,
    attention_head_dim=(4, 4, 8), norm_num_groups=16, use_linear_projection=True,
)
# SD-1-like: 2 levels, 2 layers per block, int attention_head_dim, 1x1-conv projections, GroupNorm 8.
SD1_LIKE = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8, use_linear_projection=False,
)
# SD-2-like: 4 levels, per-block heads, linear projections, two transformer layers in one block, GroupNorm 8.
SD2_LIKE = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32, 48), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(2, 4, 4, 6), norm_num_groups=8, use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 1, 1),
)
# GroupNorm 32, 2 levels, 1x1-conv projections; used with depth_blocks="all" (mid block depth-prunable too).
GN32 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=(4, 4), norm_num_groups=32, use_linear_projection=False,
)

# SDXL-like: no attention at the first level, 1/2/3 transformer layers per level (mid block 3, from the list's
# last entry), heads per level, linear projections, SDXL's text_time addition embedding (text_embeds 12-d).
SDXL_LIKE = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 48), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 3),
    cross_attention_dim=40, attention_head_dim=(2, 4, 6), use_linear_projection=True, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 12,
)
# SDXL-like, 2 levels with attention at both, 2 transformer layers everywhere (int), 1x1-conv projections; used with
# depth_blocks="all": every transformer is depth-prunable, so every layer unit is nested in a transformer unit.
SDXL_ALL = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), transformer_layers_per_block=2,
    cross_attention_dim=24, attention_head_dim=(4, 2), use_linear_projection=False, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16,
)
# SD-1.5-like: 4 levels (3 with attention), 8 heads at every level (int), 1x1-conv projections, 2 layers per block.
SD15_LIKE = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32, 32), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8, use_linear_projection=False,
)
# SD-1.5-like, 2 levels, 8 heads, one layer per block; used with depth_blocks="all".
SD15_SMALL = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 48), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12, attention_head_dim=8, norm_num_groups=16, use_linear_projection=False,
)

# name -> (config, depth_blocks, latent side used in tests)
CONFIGS = {
    "toy": (TOY, "last", 16),
    "sd1_like": (SD1_LIKE, "last", 8),
    "sd2_like": (SD2_LIKE, "last", 16),
    "gn32_all_depth": (GN32, "all", 8),
}
# The UNet families people run today (issue 15): SDXL-style (needs added_cond_kwargs, see unet_kwargs) and SD 1.5.
FAMILY_CONFIGS = {
    "sdxl_like": (SDXL_LIKE, "last", 16),
    "sdxl_all_depth": (SDXL_ALL, "all", 8),
    "sd15_like": (SD15_LIKE, "last", 16),
    "sd15_all_depth": (SD15_SMALL, "all", 8),
}
ALL_CONFIGS = {**CONFIGS, **FAMILY_CONFIGS}


def make_unet(config: dict, seed: int = 0):
    """A UNet of `config` with every parameter randomised (non-default; GroupNorm/LayerNorm affine != 1/0)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    randomize_(unet, seed)
    return unet


def randomize_(unet, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 12345)
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod in unet.modules():
            for name, p in mod.named_parameters(recurse=False):
                r = torch.randn(p.shape, generator=g)
                if isinstance(mod, norm_types):
                    p.copy_(1.0 + 0.5 * r if name == "weight" else 0.5 * r)
                elif name == "bias":
                    p.copy_(0.2 * r)
                else:
                    fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                    p.copy_(r / fan_in ** 0.5)


def inputs(config: dict, side: int, batch: int, text_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cross = config["cross_attention_dim"]
    x = torch.randn(batch, config["in_channels"], side, side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, text_len, cross, generator=g)
    return x, t, ctx


def unet_kwargs(config: dict, batch: int, seed: int) -> dict:
    """Extra keyword arguments of the UNet's forward: `added_cond_kwargs` (random text_embeds, SDXL's default
    time_ids) for an SDXL-style config, nothing otherwise."""
    added = added_cond_kwargs(config, batch, generator=torch.Generator().manual_seed(seed + 777))
    return {} if added is None else {"added_cond_kwargs": added}


def arch_suite(space, n: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """n architecture vectors: all-ones first, then keep ratios 0.2-1.0 mixed with structured cases
    (whole blocks dropped, whole width groups emptied, all but one head, every depth unit off)."""
    rng = np.random.default_rng(seed)
    out = [("ones", torch.ones(space.num_units))]
    if n > 1:  # every width group emptied, every block kept: only shortcuts and constant branches remain
        a = np.ones(space.num_units, dtype=np.float32)
        for g in space.width_groups:
            a[g.start:g.stop] = 0.0
        out.append(("all_width_empty", torch.from_numpy(a)))
    width = space.width_groups
    depth = space.depth_groups
    attn = [g for g in width if g.kind == "attn_heads"]
    modes = ["random", "drop_blocks", "empty_groups", "one_head", "no_depth", "mixed"]
    for i in range(len(out), n):
        keep = float(rng.uniform(0.2, 1.0))
        a = (rng.random(space.num_units) < keep).astype(np.float32)
        mode = modes[i % len(modes)]
        if mode in ("drop_blocks", "mixed") and depth:
            for g in depth:
                a[g.start] = float(rng.random() < 0.5)
        if mode in ("empty_groups", "mixed"):
            for g in rng.choice(len(width), size=min(3, len(width)), replace=False):
                a[width[g].start:width[g].stop] = 0.0
        if mode in ("one_head", "mixed"):
            for g in attn:
                a[g.start:g.stop] = 0.0
                a[g.start + int(rng.integers(g.num_units))] = 1.0
        if mode == "no_depth":
            for g in depth:
                a[g.start] = 0.0
        out.append((f"{mode}@{keep:.2f}", torch.from_numpy(a)))
    return out


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref - got).norm() / ref.norm().clamp_min(1e-30))


