"""Architecture space of diffusion transformers (PixArt, issue 25): gated == materialised, analytic MACs ==
FlopCounterMode, on tiny PixArt transformers with random non-default weights and fresh random inputs; and the
real PixArt-Sigma architecture's space and dense MACs on the meta device.

Default run: 8 vectors per configuration; `-m slow`: 40 (the issue's acceptance), whole blocks dropped and single
heads left included (tests/arch_testkit.arch_suite).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from arch_testkit import arch_suite, randomize_, rel_err
from diffusers import PixArtTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from aptp_export import ArchSpace
from aptp_export.materialize import apply_arch_
from aptp_export.unet_configs import PIXART_SIGMA_CONFIG, backbone_of, build_unet
from engines.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

REL_TOL = 1e-5
MACS_TOL = 0.005

# name -> (config, ArchSpace kwargs, latent (h, w) used in the tests)
DIT_CONFIGS = {
    # PixArt-Sigma-like: learned sigma (8 output channels), 3 heads of 8, two blocks, square latent
    "pixart_sigma_like": (dict(sample_size=8, num_layers=2, num_attention_heads=3, attention_head_dim=8,
                               in_channels=4, out_channels=8, cross_attention_dim=24, caption_channels=16,
                               patch_size=2, interpolation_scale=1), {}, (8, 8)),
    # 3 blocks, 4 heads of 4, 8 feed-forward groups, a non-square latent (the positional embedding is
    # recomputed for it), 3 channels in and out
    "pixart_wide_ff": (dict(sample_size=8, num_layers=3, num_attention_heads=4, attention_head_dim=4,
                            in_channels=3, out_channels=3, cross_attention_dim=16, caption_channels=20,
                            patch_size=2), {"ff_groups": 8}, (8, 12)),
    # no depth units: width only
    "pixart_no_depth": (dict(sample_size=6, num_layers=2, num_attention_heads=2, attention_head_dim=6,
                             in_channels=4, out_channels=4, cross_attention_dim=12, caption_channels=10,
                             patch_size=3), {"layer_depth": "none", "ff_groups": 16}, (6, 6)),
}
_MODELS: dict = {}


def _model(name):
    if name not in _MODELS:
        cfg, kw, hw = DIT_CONFIGS[name]
        torch.manual_seed(len(_MODELS) + 1)
        model = PixArtTransformer2DModel(**cfg).eval()
        randomize_(model, seed=len(_MODELS) + 1)
        model.set_attn_processor(AttnProcessor())  # counted by FlopCounterMode (SDPA is not)
        _MODELS[name] = (cfg, model, ArchSpace.from_unet(model, **kw), hw)
    return _MODELS[name]


def _inputs(cfg, hw, batch, text_len, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], *hw, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, text_len, cfg["caption_channels"], generator=g)
    return x, t, ctx


def _sweep(name: str, n_vectors: int, seed: int) -> dict:
    cfg, model, space, hw = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    worst = {"rel": 0.0, "macs": 0.0}
    for i, (label, a) in enumerate(arch_suite(space, n_vectors, seed)):
        batch, text_len = 2, 3 + (i % 5)
        x, t, ctx = _inputs(cfg, hw, batch, text_len, seed=1000 * seed + i)
        with torch.no_grad():
            with space.gated(model, a):
                y_masked = model(x, encoder_hidden_states=ctx, timestep=t).sample
            expert = space.materialize(model, a)
            with FlopCounterMode(display=False) as fc:
                y_pruned = expert(x, encoder_hidden_states=ctx, timestep=t).sample
        err = rel_err(y_masked, y_pruned)
        assert err <= REL_TOL, f"{name} {label}: masked vs materialised rel. error {err:.3g}"
        measured = fc.get_total_flops() / 2 / batch
        predicted = space.macs(a.tolist(), hw[0], hw[1], text_len)
        dev = abs(predicted - measured) / measured
        assert dev <= MACS_TOL, f"{name} {label}: analytic {predicted:.0f} vs measured {measured:.0f} MACs"
        if label == "ones":
            with torch.no_grad():
                y_dense = model(x, encoder_hidden_states=ctx, timestep=t).sample
            assert torch.equal(y_dense, y_pruned) and torch.equal(y_dense, y_masked)
            assert sum(p.numel() for p in expert.parameters()) == sum(p.numel() for p in model.parameters())
        worst["rel"] = max(worst["rel"], err)
        worst["macs"] = max(worst["macs"], dev)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "materialize modified its input"
    return worst


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_dit_masked_equals_materialised_light(name):
    worst = _sweep(name, n_vectors=8, seed=1)
    print(f"{name}: max rel err {worst['rel']:.2e}, max MACs deviation {100 * worst['macs']:.4f} %")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_dit_masked_equals_materialised_sweep(name):
    worst = _sweep(name, n_vectors=40, seed=2)
    print(f"{name}: 40 vectors, max rel err {worst['rel']:.2e}, max MACs deviation {100 * worst['macs']:.4f} %")


def test_dit_space_units_and_order():
    cfg, model, space, _ = _model("pixart_sigma_like")
    kinds = [(g.name, g.kind, g.num_units, g.unit_channels) for g in space.groups]
    assert kinds[:3] == [("transformer_blocks.0.attn1", "attn_heads", 3, 8),
                         ("transformer_blocks.0.attn2", "attn_heads", 3, 8),
                         ("transformer_blocks.0.ff", "ff_width", 32, 3)]  # GELU ff: 4 x 24 = 96 channels
    assert [g.kind for g in space.depth_groups] == ["layer_depth", "layer_depth"]
    assert space.num_units == 2 * (3 + 3 + 32) + 2
    # a removed block removes its width units: the vector with block 0 off equals the one with its units off too
    a = np.ones(space.num_units)
    a[space.group("transformer_blocks.0", "layer_depth").start] = 0
    assert float(space.effective(a)[:38].sum()) == 0.0
    # the space rebuilds from its description
    assert ArchSpace.from_dict(space.to_dict()) == space
    assert backbone_of(space.unet_config) == "pixart"


def test_pixart_sigma_space_and_dense_macs_on_meta():
    """The real PixArt-Sigma XL-2 1024 architecture: 28 blocks x (16 + 16 heads, 32 ff groups) + 28 depth units;
    analytic dense MACs equal FlopCounterMode / 2 on the meta device at 1024 px (128x128 latent, 300 T5
    tokens), and so do those of a random expert."""
    space = ArchSpace.from_config(PIXART_SIGMA_CONFIG)
    assert space.num_units == 28 * (16 + 16 + 32) + 28
    assert 600e6 < space.dense_params < 620e6  # PixArt-Sigma XL-2: 611 M parameters
    rng = np.random.default_rng(0)
    for arch in (np.ones(space.num_units), (rng.random(space.num_units) < 0.6).astype(np.float32)):
        model = build_unet(space.unet_config, device="meta")
        apply_arch_(space, model, arch > 0.5)
        model.set_attn_processor(AttnProcessor())
        x = torch.zeros(1, 4, 128, 128, device="meta")
        ctx = torch.zeros(1, 300, 4096, device="meta")
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x, encoder_hidden_states=ctx, timestep=torch.ones(1, device="meta"))
        measured = fc.get_total_flops() / 2
        predicted = space.macs(arch.tolist(), 128, 128, 300)
        assert abs(predicted - measured) / measured < 1e-6, (predicted, measured)


def test_dit_rejections():
    with pytest.raises(UserError, match="use_additional_conditions"):
        ArchSpace.from_config({**DIT_CONFIGS["pixart_sigma_like"][0], "use_additional_conditions": True})
    model = PixArtTransformer2DModel(**DIT_CONFIGS["pixart_sigma_like"][0])
    model.fuse_qkv_projections()
    with pytest.raises(UserError, match=r"PixArtTransformer2DModel: fused QKV .*unfuse_qkv_projections"):
        ArchSpace.from_unet(model)


def test_pixart_expert_round_trip_is_bit_exact(tmp_path):
    """A PixArt expert with a removed block saves to safetensors + arch.json and loads bit-exact."""
    from aptp_export.expert_io import load_expert, save_expert

    cfg, model, space, hw = _model("pixart_wide_ff")
    a = space.sample(torch.Generator().manual_seed(5), keep=0.7)
    for g in space.depth_groups:
        a[g.start] = 1.0
    a[space.group("transformer_blocks.1", "layer_depth").start] = 0
    expert = space.materialize(model, a)
    loaded = load_expert(save_expert(tmp_path / "px", space, a, expert, height=hw[0], width=hw[1], text_len=4))
    assert isinstance(loaded, PixArtTransformer2DModel)
    s1, s2 = expert.state_dict(), loaded.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    x, t, ctx = _inputs(cfg, hw, 2, 4, seed=9)
    loaded.set_attn_processor(AttnProcessor())
    with torch.no_grad():
        assert torch.equal(expert(x, encoder_hidden_states=ctx, timestep=t).sample,
                           loaded(x, encoder_hidden_states=ctx, timestep=t).sample)


def test_inspect_cli_pixart(capsys, tmp_path):
    import json

    from aptp import cli

    space = ArchSpace.from_config(PIXART_SIGMA_CONFIG)
    assert cli.main(["inspect", "--pixart"]) == 0
    out = capsys.readouterr().out
    gmacs = space.macs(space.ones().tolist(), 128, 128, 300) / 1e9  # = FlopCounterMode (test above)
    assert f"D = {space.num_units} units" in out and f"{gmacs:.3f} GMACs at a 128x128 latent, 300 tokens" in out
    cfg = DIT_CONFIGS["pixart_no_depth"][0]
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "PixArtTransformer2DModel", **cfg}))
    assert cli.main(["inspect", "--unet", str(tmp_path), "--json", "--ff-groups", "16"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["num_units"] == ArchSpace.from_config(cfg, ff_groups=16).num_units
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    assert cli.main(["inspect", "--unet", str(tmp_path)]) == 2
    assert "SD3Transformer2DModel, expected UNet2DConditionModel or PixArtTransformer2DModel" in capsys.readouterr().err
