"""Analytic MACs against torch's FlopCounterMode on the Stable Diffusion 2.1, 1.5 and XL UNet architectures.

Runs on the meta device (shapes only, no weights): FlopCounterMode counts the FLOPs of every matmul and
convolution from shapes, so the dense SD 2.1 UNet and pruned SD 2.1 experts are measured in a second each.
The classic AttnProcessor is used because FlopCounterMode does count its bmm attention products.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from aptp_export import ArchSpace
from aptp_export.materialize import apply_arch_
from aptp_export.unet_configs import (
    SD15_UNET_CONFIG,
    SD21_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    added_cond_kwargs,
    build_unet,
)

SD21_DENSE_GMACS = 1074.55  # docs/method.md section 6 (measured with FlopCounterMode / 2)
PAPER_GMACS = 1384.2  # the APTP paper's SD 2.1 figure
SDXL_DENSE_GMACS = 3380.62  # 128x128 latent (1024 px), 77 tokens, batch 1 (FlopCounterMode / 2 on meta)
SD15_DENSE_GMACS = 401.64  # 64x64 latent (512 px), 77 tokens, batch 1


@pytest.fixture(scope="module")
def sd21():
    return ArchSpace.from_config(SD21_UNET_CONFIG)


def measured_macs(space, arch, height, width, text_len) -> float:
    model = build_unet(space.unet_config, device="meta")
    apply_arch_(space, model, np.asarray(arch) > 0.5)
    model.set_attn_processor(AttnProcessor())
    x = torch.zeros(1, model.config.in_channels, height, width, device="meta")
    ctx = torch.zeros(1, text_len, model.config.cross_attention_dim, device="meta")
    added = added_cond_kwargs(model.config, 1, device="meta")
    kw = {} if added is None else {"added_cond_kwargs": added}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, torch.ones(1, device="meta"), ctx, **kw)
    return fc.get_total_flops() / 2


def test_sd21_space_matches_reference_unit_counts(sd21):
    # docs/method.md section 1: 70 width groups, 1606 width units, 14 depth units, D = 1620
    assert len(sd21.width_groups) == 70
    assert sum(g.num_units for g in sd21.width_groups) == 1606
    assert len(sd21.depth_groups) == 14 and sd21.num_units == 1620
    assert sd21.dense_params == 865_910_724


def test_sd21_dense_macs(sd21):
    analytic = sd21.dense_macs(96, 96, 77)
    assert abs(analytic / 1e9 - SD21_DENSE_GMACS) / SD21_DENSE_GMACS < 0.005
    measured = measured_macs(sd21, np.ones(sd21.num_units), 96, 96, 77)
    assert abs(analytic - measured) / measured < 0.005
    # breakdown of docs/method.md: convolutions 470.66 G, linear layers 289.83 G, attention products 314.07 G
    mods = dict(build_unet(SD21_UNET_CONFIG).named_modules())
    parts = {"conv": 0.0, "linear": 0.0, "products": 0.0}
    for name, v in sd21.macs_by_module(None, 96, 96, 77).items():
        kind = "products" if name.endswith(".products") else (
            "conv" if isinstance(mods[name], torch.nn.Conv2d) else "linear")
        parts[kind] += v / 1e9
    assert parts["conv"] == pytest.approx(470.66, abs=0.01)
    assert parts["linear"] == pytest.approx(289.83, abs=0.01)
    assert parts["products"] == pytest.approx(314.07, abs=0.01)
    # the paper's convention: attention products counted twice (2 MACs per multiply-add) lands within 0.35 %
    assert abs(analytic / 1e9 + parts["products"] - PAPER_GMACS) / PAPER_GMACS < 0.0035


@pytest.mark.parametrize("seed, keep, size", [(0, 0.78, (96, 96)), (1, 0.5, (64, 64)), (2, 0.3, (100, 60))])
def test_sd21_expert_macs_match_measured(sd21, seed, keep, size):
    rng = np.random.default_rng(seed)
    a = (rng.random(sd21.num_units) < keep).astype(np.float32)
    if seed == 1:  # drop every other depth unit and keep one head per attention
        for i, g in enumerate(sd21.depth_groups):
            a[g.start] = float(i % 2)
        for g in sd21.width_groups:
            if g.kind == "attn_heads":
                a[g.start:g.stop] = 0
                a[g.start + int(rng.integers(g.num_units))] = 1
    if seed == 2:  # empty a few whole width groups
        for g in sd21.width_groups[::9]:
            a[g.start:g.stop] = 0
    h, w = size  # (100, 60) is not a multiple of 8: up-samplers then match the skips' sizes
    analytic = sd21.macs(a.tolist(), h, w, 77)
    measured = measured_macs(sd21, a, h, w, 77)
    assert abs(analytic - measured) / measured < 0.005
    assert analytic < sd21.dense_macs(h, w, 77)


def test_sd15_dense_macs_and_units():
    sd15 = ArchSpace.from_config(SD15_UNET_CONFIG)
    assert sd15.dense_params == 859_520_964
    assert not [g for g in sd15.depth_groups if g.kind == "layer_depth"]  # one layer per transformer
    assert (len(sd15.width_groups), len(sd15.depth_groups), sd15.num_units) == (70, 14, 1486)
    analytic = sd15.dense_macs(64, 64, 77)
    assert analytic / 1e9 == pytest.approx(SD15_DENSE_GMACS, abs=0.01)
    assert abs(analytic - measured_macs(sd15, np.ones(sd15.num_units), 64, 64, 77)) / analytic < 1e-6


@pytest.fixture(scope="module")
def sdxl():
    return ArchSpace.from_config(SDXL_UNET_CONFIG)


def test_sdxl_space_and_dense_macs_at_1024px(sdxl):
    assert sdxl.dense_params == 2_567_463_684
    layers = [g for g in sdxl.depth_groups if g.kind == "layer_depth"]
    # 2-layer transformers: 2 down + 3 up at level 1; 10-layer ones: 2 down + 3 up + mid at level 2
    assert len(layers) == 2 * (2 + 3) + 10 * (2 + 3 + 1) == 70
    assert (len(sdxl.width_groups), len(sdxl.depth_groups), sdxl.num_units) == (227, 80, 5464)
    nested = [g for g in layers if g.depth_unit is not None]
    assert len(nested) == 2 + 2 + 10 + 10  # layers of the last transformer of each down and up block
    analytic = sdxl.dense_macs(128, 128, 77)
    assert analytic / 1e9 == pytest.approx(SDXL_DENSE_GMACS, abs=0.01)
    assert abs(analytic - measured_macs(sdxl, np.ones(sdxl.num_units), 128, 128, 77)) / analytic < 1e-6
    assert sdxl.macs_by_module()["add_embedding.linear_1"] == 2816 * 1280


@pytest.mark.slow
@pytest.mark.parametrize("seed, keep, size", [(0, 0.7, (128, 128)), (1, 0.5, (64, 96))])
def test_sdxl_expert_macs_match_measured(sdxl, seed, keep, size):
    rng = np.random.default_rng(seed)
    a = (rng.random(sdxl.num_units) < keep).astype(np.float32)
    for i, g in enumerate(sdxl.depth_groups):  # every other depth unit off: layers, nested ones included
        a[g.start] = float((i + seed) % 2)
    h, w = size
    analytic = sdxl.macs(a.tolist(), h, w, 77)
    assert abs(analytic - measured_macs(sdxl, a, h, w, 77)) / analytic < 0.005
