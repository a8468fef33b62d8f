"""Architecture space of diffusion transformers (PixArt and SD3 / MMDiT, issue 25): gated == materialised,
analytic MACs == FlopCounterMode, on tiny PixArt and SD3 transformers with random non-default weights and fresh
random inputs; and the real PixArt-Sigma and SD3-medium architectures' spaces and dense MACs on the meta device.

Default run: 8 vectors per configuration; `-m slow`: 40 (the issue's acceptance), whole blocks dropped and single
heads left included (tests/arch_testkit.arch_suite).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from arch_testkit import arch_suite, randomize_, rel_err
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_processor import AttnProcessor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from aptp_export import ArchSpace
from aptp_export.materialize import apply_arch_
from aptp_export.unet_configs import PIXART_SIGMA_CONFIG, SD3_MEDIUM_CONFIG, SD3_TEXT_LEN, backbone_of, build_unet
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
    # SD3-like MMDiT: 3 joint blocks of 3 heads x 8, the last context-pre-only; position table cropped from 8x8
    "sd3_like": (dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                      num_attention_heads=3, joint_attention_dim=12, caption_projection_dim=24,
                      pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8), {}, (8, 8)),
    # SD3.5-like: per-head RMS query/key norms, dual self-attention in blocks 0 and 1, a non-square latent
    "sd35_like": (dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
                       num_attention_heads=4, joint_attention_dim=10, caption_projection_dim=16,
                       pooled_projection_dim=6, out_channels=4, pos_embed_max_size=12, qk_norm="rms_norm",
                       dual_attention_layers=(0, 1)), {"ff_groups": 8}, (8, 12)),
}
_CLASSES = {"pixart": PixArtTransformer2DModel, "sd3": SD3Transformer2DModel}
_MODELS: dict = {}


def _model(name):
    if name not in _MODELS:
        cfg, kw, hw = DIT_CONFIGS[name]
        torch.manual_seed(len(_MODELS) + 1)
        model = _CLASSES[name.split("_")[0].replace("sd35", "sd3")](**cfg).eval()
        randomize_(model, seed=len(_MODELS) + 1)
        if isinstance(model, PixArtTransformer2DModel):
            model.set_attn_processor(AttnProcessor())  # counted by FlopCounterMode (SDPA is not)
        _MODELS[name] = (cfg, model, ArchSpace.from_unet(model, **kw), hw)
    return _MODELS[name]


def _inputs(cfg, hw, batch, text_len, seed):
    """(x, kwargs) for model(x, **kwargs): PixArt takes an integer timestep and the caption's padding mask,
    SD3 (flow matching) a float timestep and a pooled text embedding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], *hw, generator=g)
    if "joint_attention_dim" in cfg:
        return x, {"timestep": 1000 * torch.rand(batch, generator=g),
                   "encoder_hidden_states": torch.randn(batch, text_len, cfg["joint_attention_dim"], generator=g),
                   "pooled_projections": torch.randn(batch, cfg["pooled_projection_dim"], generator=g)}
    mask = torch.ones(batch, text_len, dtype=torch.int64)
    mask[0, text_len // 2 + 1:] = 0  # a padded caption: the cross-attention masks its tail
    return x, {"timestep": torch.randint(0, 1000, (batch,), generator=g),
               "encoder_hidden_states": torch.randn(batch, text_len, cfg["caption_channels"], generator=g),
               "encoder_attention_mask": mask}


def _run(model, x, kw):
    with sdpa_kernel(SDPBackend.MATH):  # SD3's processor calls SDPA: the math kernel is counted as matmuls
        return model(x, **kw).sample


def _sweep(name: str, n_vectors: int, seed: int) -> dict:
    cfg, model, space, hw = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    worst = {"rel": 0.0, "macs": 0.0}
    for i, (label, a) in enumerate(arch_suite(space, n_vectors, seed)):
        batch, text_len = 2, 3 + (i % 5)
        x, kw = _inputs(cfg, hw, batch, text_len, seed=1000 * seed + i)
        with torch.no_grad():
            with space.gated(model, a):
                y_masked = _run(model, x, kw)
            expert = space.materialize(model, a)
            with FlopCounterMode(display=False) as fc:
                y_pruned = _run(expert, x, kw)
        err = rel_err(y_masked, y_pruned)
        assert err <= REL_TOL, f"{name} {label}: masked vs materialised rel. error {err:.3g}"
        measured = fc.get_total_flops() / 2 / batch
        predicted = space.macs(a.tolist(), hw[0], hw[1], text_len)
        dev = abs(predicted - measured) / measured
        assert dev <= MACS_TOL, f"{name} {label}: analytic {predicted:.0f} vs measured {measured:.0f} MACs"
        if label == "ones":
            with torch.no_grad():
                y_dense = _run(model, x, kw)
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


def test_sd3_space_units_and_order():
    """MMDiT units: one joint head = the head in both streams; the last block has no text feed-forward and
    no text output projection; SD3.5's dual attention adds plain heads; per-head RMS norms are accepted."""
    cfg, model, space, _ = _model("sd3_like")
    kinds = [(g.name, g.kind, g.num_units) for g in space.groups]
    assert kinds[:3] == [("transformer_blocks.0.attn", "joint_heads", 3), ("transformer_blocks.0.ff", "ff_width", 32),
                         ("transformer_blocks.0.ff_context", "ff_width", 32)]
    assert ("transformer_blocks.2.ff_context", "ff_width", 32) not in kinds  # context-pre-only block
    assert [g.kind for g in space.depth_groups] == ["joint_depth"] * 3
    assert space.num_units == 2 * (3 + 32 + 32) + (3 + 32) + 3
    assert backbone_of(space.unet_config) == "sd3" and ArchSpace.from_dict(space.to_dict()) == space
    _, _, space35, _ = _model("sd35_like")
    assert [g.kind for g in space35.groups if g.name.startswith("transformer_blocks.0.")][:2] == ["joint_heads",
                                                                                                 "attn_heads"]
    # a joint head's MACs: both streams' q/k/v and outputs and the products over N + L tokens
    a = space.ones().numpy()
    g0 = space.group("transformer_blocks.0.attn", "joint_heads")
    a[g0.start] = 0
    n, L, d, width = 16, 5, 8, 24
    per_head = 3 * n * width * d + 3 * L * width * d + 2 * (n + L) ** 2 * d + n * d * width + L * d * width
    assert space.macs(space.ones().tolist(), 8, 8, L) - space.macs(a.tolist(), 8, 8, L) == per_head


def test_sd3_medium_space_and_dense_macs_on_meta():
    """The real SD3-medium architecture: 24 joint blocks (24 heads, 32 + 32 ff groups; the last block's text
    side is pre-only) + 24 depth units; analytic MACs equal FlopCounterMode / 2 on the meta device at
    1024 px (128x128x16 latent, 333 text tokens), dense and for a random expert."""
    space = ArchSpace.from_config(SD3_MEDIUM_CONFIG)
    assert space.num_units == 24 * (24 + 32) + 23 * 32 + 24
    assert 2.0e9 < space.dense_params < 2.1e9  # SD3-medium MMDiT: 2.03 B parameters
    rng = np.random.default_rng(1)
    for arch in (np.ones(space.num_units), (rng.random(space.num_units) < 0.6).astype(np.float32)):
        model = build_unet(space.unet_config, device="meta")
        apply_arch_(space, model, arch > 0.5)
        kw = {"encoder_hidden_states": torch.zeros(1, SD3_TEXT_LEN, 4096, device="meta"),
              "pooled_projections": torch.zeros(1, 2048, device="meta"), "timestep": torch.ones(1, device="meta")}
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            _run(model, torch.zeros(1, 16, 128, 128, device="meta"), kw)
        measured = fc.get_total_flops() / 2
        predicted = space.macs(arch.tolist(), 128, 128, SD3_TEXT_LEN)
        assert abs(predicted - measured) / measured < 1e-6, (predicted, measured)


def test_sd3_expert_round_trip_is_bit_exact(tmp_path):
    from aptp_export.expert_io import load_expert, save_expert
    from aptp_export.unit_kinds import ConstantJointAttention, JointBlockSkip

    cfg, model, space, hw = _model("sd35_like")
    a = space.ones().numpy()
    a[space.group("transformer_blocks.1", "joint_depth").start] = 0  # the context-pre-only block removed
    g = space.group("transformer_blocks.0.attn", "joint_heads")
    a[g.start:g.stop] = 0  # every joint head of block 0 removed
    a[space.group("transformer_blocks.0.attn2", "attn_heads").start] = 0
    expert = space.materialize(model, a)
    assert isinstance(expert.get_submodule("transformer_blocks.0.attn"), ConstantJointAttention)
    assert isinstance(expert.get_submodule("transformer_blocks.1"), JointBlockSkip)
    loaded = load_expert(save_expert(tmp_path / "sd3", space, a, expert, height=hw[0], width=hw[1], text_len=4))
    assert isinstance(loaded, SD3Transformer2DModel)
    s1, s2 = expert.state_dict(), loaded.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    x, kw = _inputs(cfg, hw, 2, 4, seed=9)
    with torch.no_grad():
        y = _run(expert, x, kw)
        assert torch.equal(y, _run(loaded, x, kw))
        with space.gated(model, a):
            assert rel_err(_run(model, x, kw), y) <= REL_TOL


def test_dit_rejections():
    with pytest.raises(UserError, match="use_additional_conditions"):
        ArchSpace.from_config({**DIT_CONFIGS["pixart_sigma_like"][0], "use_additional_conditions": True})
    model = PixArtTransformer2DModel(**DIT_CONFIGS["pixart_sigma_like"][0])
    model.fuse_qkv_projections()
    with pytest.raises(UserError, match=r"PixArtTransformer2DModel: fused QKV .*unfuse_qkv_projections"):
        ArchSpace.from_unet(model)
    from aptp_export.arch_space import _Discovery
    from aptp_export.unet_configs import clean_config

    sd3 = SD3Transformer2DModel(**DIT_CONFIGS["sd3_like"][0])
    sd3.transformer_blocks[0].attn.norm_q = torch.nn.LayerNorm(24)  # a norm over all heads: not per head
    with pytest.raises(UserError, match="norm_q of type LayerNorm over \\(24,\\)"):
        _Discovery(sd3, clean_config(sd3.config), "last", 32).run()
    # a per-head LayerNorm (SD3 qk_norm="layer_norm") is exact in principle, but torch-pruning couples its
    # weight and bias to the heads: refused up front, not at materialisation
    ln = SD3Transformer2DModel(**{**DIT_CONFIGS["sd3_like"][0], "qk_norm": "layer_norm"})
    with pytest.raises(UserError, match="norm_q of type LayerNorm.*only a per-head RMSNorm"):
        ArchSpace.from_unet(ln)
    # an unknown denoiser class is named, not guessed from its keys
    with pytest.raises(UserError, match="unsupported denoiser class 'FluxTransformer2DModel'"):
        backbone_of({"_class_name": "FluxTransformer2DModel", "joint_attention_dim": 4096})
    assert backbone_of({"_class_name": "Transformer2DModel", "norm_type": "ada_norm_single"}) == "pixart"


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
    x, kw = _inputs(cfg, hw, 2, 4, seed=9)
    loaded.set_attn_processor(AttnProcessor())
    with torch.no_grad():
        assert torch.equal(_run(expert, x, kw), _run(loaded, x, kw))


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
    sd3 = ArchSpace.from_config(SD3_MEDIUM_CONFIG)
    assert cli.main(["inspect", "--sd3"]) == 0
    gmacs = sd3.macs(sd3.ones().tolist(), 128, 128, SD3_TEXT_LEN) / 1e9
    out = capsys.readouterr().out
    assert f"D = {sd3.num_units} units" in out and f"{gmacs:.3f} GMACs at a 128x128 latent, 333 tokens" in out
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    assert cli.main(["inspect", "--unet", str(tmp_path)]) == 2
    assert "FluxTransformer2DModel, expected UNet2DConditionModel, PixArtTransformer2DModel or SD3" in \
        capsys.readouterr().err


@pytest.mark.parametrize("name", ["pixart_sigma_like", "sd35_like"])
def test_dit_expert_onnx_equals_torch(name, tmp_path):
    """A pruned DiT expert exported through UNetGraph + dit_unet_spec: onnxruntime equals torch (fp32) on fresh
    inputs at another batch size; PixArt's graph returns the noise half of its learned-sigma output."""
    import onnxruntime as ort

    from aptp_export.export_spec import dit_unet_spec
    from aptp_export.onnx_export import UNetGraph, export_onnx

    cfg, model, space, hw = _model(name)
    a = space.sample(torch.Generator().manual_seed(11), keep=0.6)
    expert = space.materialize(model, a)
    spec = dit_unet_spec(expert.config, hw, text_len=5)
    assert [t.name for t in spec.inputs][3:] == (["encoder_attention_mask"] if name.startswith("pixart")
                                                 else ["pooled_projections"])
    res = export_onnx(UNetGraph(expert), spec, tmp_path / "e.onnx")
    assert res.max_rel_error["out_sample"] <= REL_TOL
    x, kw = _inputs(cfg, hw, 3, 5, seed=12)
    feeds = {"sample": x, "timestep": kw["timestep"].float(), "encoder_hidden_states": kw["encoder_hidden_states"]}
    if name.startswith("pixart"):
        mask = torch.ones(3, 5, dtype=torch.int64)
        mask[1, 3:] = 0  # a padded caption
        feeds["encoder_attention_mask"] = mask
        with torch.no_grad():
            ref = expert(x, encoder_hidden_states=kw["encoder_hidden_states"], timestep=kw["timestep"],
                         encoder_attention_mask=mask).sample[:, :cfg["in_channels"]]
    else:
        feeds["pooled_projections"] = kw["pooled_projections"]
        with torch.no_grad():
            ref = expert(x, **kw).sample
    sess = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    assert got.shape == tuple(ref.shape) and got.shape[1] == cfg["in_channels"]
    assert rel_err(torch.from_numpy(got), ref) <= REL_TOL
