"""ArchSpace: units and their order, vectors and validation, unsupported UNets, soft MACs, gating semantics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from arch_testkit import (
    ALL_CONFIGS,
    SD1_LIKE,
    SDXL_ALL,
    SDXL_LIKE,
    TOY,
    inputs,
    make_unet,
    rel_err,
    unet_kwargs,
)

from aptp_export import ArchSpace, UserError
from aptp_export.unet_configs import build_unet
from aptp_export.unit_kinds import DEPTH_KINDS, WIDTH_KINDS

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def toy():
    unet = make_unet(TOY, seed=3)
    return unet, ArchSpace.from_unet(unet)


# ------------------------------------------------------------------ structure
@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_groups_tile_the_vector_width_first(name):
    cfg, depth_blocks, _ = ALL_CONFIGS[name]
    space = ArchSpace.from_config(cfg, depth_blocks=depth_blocks)
    pos = 0
    seen_depth = False
    for g in space.groups:
        assert g.start == pos and g.stop > g.start
        pos = g.stop
        if g.kind in DEPTH_KINDS:
            seen_depth = True
            assert g.num_units == 1 and g.unit_channels == 1
            if g.depth_unit is not None:  # only a transformer layer nests, in its transformer
                outer = next(d for d in space.depth_groups if d.start == g.depth_unit)
                assert g.kind == "layer_depth" and outer.kind == "transformer_depth"
                assert g.name.startswith(outer.name + ".") and g.depth_units == (g.depth_unit,)
        else:
            assert g.kind in WIDTH_KINDS and not seen_depth, "width units must all come before depth units"
            if g.depth_unit is not None:
                block = next(d for d in space.depth_groups if d.start == g.depth_unit)
                assert g.name.startswith(block.name + ".") or g.name == block.name
                assert g.depth_units[-1] == g.depth_unit and g.depth_units == (*block.depth_units, g.depth_unit)
    assert pos == space.num_units
    # the structure matches the modules: channels per unit x units = the gated dimension
    mods = dict(build_unet(cfg).named_modules())
    for g in space.width_groups:
        m = mods[g.name]
        gated = {"resnet_width": "conv2", "attn_heads": "to_out.0", "ff_width": "net.2"}[g.kind]
        layer = m.get_submodule(gated)
        ch = layer.in_channels if isinstance(layer, torch.nn.Conv2d) else layer.in_features
        assert g.num_units * g.unit_channels == ch
        if g.kind == "resnet_width":
            assert g.num_units == m.norm2.num_groups
        if g.kind == "attn_heads":
            assert g.num_units == m.heads


def test_reference_depth_units_and_options():
    last = ArchSpace.from_config(TOY)
    names = [g.name for g in last.depth_groups]
    # last ResBlock and last transformer of every down/up block; never the mid block
    assert names == ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "down_blocks.1.attentions.0",
                     "down_blocks.2.resnets.0", "down_blocks.2.attentions.0", "up_blocks.0.resnets.1",
                     "up_blocks.0.attentions.1", "up_blocks.1.resnets.1", "up_blocks.1.attentions.1",
                     "up_blocks.2.resnets.1"]
    none = ArchSpace.from_config(TOY, depth_blocks="none")
    assert not none.depth_groups and none.num_units == last.num_units - len(names)
    every = ArchSpace.from_config(TOY, depth_blocks="all")
    assert any(g.name.startswith("mid_block") for g in every.depth_groups)
    import re

    pattern = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(resnets|attentions)\.\d+$")
    n_blocks = sum(1 for n, _ in build_unet(TOY).named_modules() if pattern.match(n))
    assert len(every.depth_groups) == n_blocks == 18  # every ResBlock and transformer, mid block included
    assert ArchSpace.from_config(TOY, ff_groups=16).num_units == last.num_units - 7 * 16
    with pytest.raises(UserError, match="depth_blocks"):
        ArchSpace.from_config(TOY, depth_blocks="first")
    with pytest.raises(UserError, match="ff_groups"):
        ArchSpace.from_config(TOY, ff_groups=0)
    with pytest.raises(UserError, match="divisible"):
        ArchSpace.from_config(TOY, ff_groups=7)


def test_space_from_partial_config_accepts_models_built_from_it(toy):
    unet, space = toy
    again = ArchSpace.from_config(TOY)  # a partial config: diffusers fills in its defaults
    assert again == space and again.unet_config["act_fn"] == "silu"
    with torch.no_grad(), again.gated(unet, again.ones()):
        pass
    with pytest.raises(UserError, match="config differs"):
        ArchSpace.from_config({**TOY, "attention_head_dim": (2, 2, 4)}).check_unet(unet)  # same shapes, other heads


def test_to_dict_round_trip_is_json():
    space = ArchSpace.from_config(SD1_LIKE, depth_blocks="all", ff_groups=16)
    d = json.loads(json.dumps(space.to_dict()))
    again = ArchSpace.from_dict(d)
    assert again == space and again.groups == space.groups and again.num_units == space.num_units
    with pytest.raises(UserError, match="unknown key"):
        ArchSpace.from_dict({**d, "typo": 1})
    with pytest.raises(UserError, match="units"):
        ArchSpace.from_dict({**d, "num_units": d["num_units"] + 1})


# ------------------------------------------------------------------ vectors
def test_sample_and_validate(toy):
    _, space = toy
    a = space.sample(torch.Generator().manual_seed(0), keep=0.6)
    b = space.sample(torch.Generator().manual_seed(0), keep=0.6)
    assert a.dtype == torch.float32 and a.shape == (space.num_units,) and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and 0.5 < a.mean().item() < 0.7
    space.validate(a)
    space.validate(a.repeat(3, 1))
    space.validate(a.tolist())
    D = space.num_units
    bad = [
        (torch.ones(D - 1), "length"), (torch.ones(2, 3, D), "shape"), (torch.full((D,), float("nan")), "NaN"),
        (torch.full((D,), 1.5), r"\[0, 1\]"), (-torch.ones(D), r"\[0, 1\]"), (["a"] * D, "numeric"),
    ]
    for arch, msg in bad:
        with pytest.raises(UserError, match=msg):
            space.validate(arch)
        with pytest.raises(UserError, match=msg):
            space.macs(arch)
    # straight-through rounding (1 + 1 ulp) is accepted
    space.validate(torch.full((D,), 1.0000001))
    with pytest.raises(UserError, match="keep"):
        space.sample(keep=1.5)


# ------------------------------------------------------------------ unsupported UNets
@pytest.mark.parametrize("change, needle", [
    (dict(class_embed_type="timestep"), "class embeddings"),
    (dict(resnet_time_scale_shift="scale_shift"), "time_embedding_norm"),
    (dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
     "AttnDownBlock2D"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid block"),
    (dict(addition_embed_type="text", encoder_hid_dim=24), "addition embeddings"),
])
def test_unsupported_config_is_named(change, needle):
    cfg = {**SD1_LIKE, "layers_per_block": 1, **change}
    with pytest.raises(UserError, match=f"unsupported UNet.*{needle}"):
        ArchSpace.from_config(cfg)


def test_unsupported_models_are_named(toy):
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    unet, space = toy
    with pytest.raises(UserError, match="UNet2DConditionModel"):
        ArchSpace.from_unet(torch.nn.Linear(2, 2))
    expert = space.materialize(unet, space.sample(torch.Generator().manual_seed(1), keep=0.5))
    with pytest.raises(UserError, match="pruned expert"):
        ArchSpace.from_unet(expert)
    with pytest.raises(UserError, match="pruned expert"):
        with space.gated(expert, space.ones()):
            pass
    other = make_unet(SD1_LIKE)
    other.set_attn_processor(AttnAddedKVProcessor())
    with pytest.raises(UserError, match="attention processor AttnAddedKVProcessor"):
        ArchSpace.from_unet(other)
    # a feed-forward that is neither GEGLU nor GELU (PixArt's)
    from diffusers.models.activations import ApproximateGELU

    m = build_unet(SD1_LIKE)
    ff = m.down_blocks[0].attentions[0].transformer_blocks[0].ff
    ff.net[0] = ApproximateGELU(32, 128)
    from aptp_export.arch_space import _Discovery

    with pytest.raises(UserError, match="feed-forward activation ApproximateGELU"):
        _Discovery(m, SD1_LIKE, "last", 32).run()


# ------------------------------------------------------------------ MACs
def test_macs_soft_differentiable_and_batched(toy):
    _, space = toy
    D = space.num_units
    dense = space.dense_macs(32, 32, 16)
    assert space.macs(space.ones(), 32, 32, 16).item() == pytest.approx(dense, rel=1e-6)
    assert space.macs(np.ones(D), 32, 32, 16) == pytest.approx(dense)
    soft = torch.rand(3, D, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    m = space.macs(soft, 32, 32, 16)
    assert m.shape == (3,)
    m.sum().backward()
    assert soft.grad is not None and bool((soft.grad > 0).all()), "every unit must cost MACs"
    for i in range(3):  # rows are independent
        assert space.macs(soft[i].detach(), 32, 32, 16).item() == pytest.approx(m[i].item(), rel=1e-6)
    # a depth unit removes its block including its width units; an emptied group costs nothing more
    g = next(g for g in space.width_groups if g.depth_unit is not None)
    a = np.ones(D)
    a[g.depth_unit] = 0
    b = a.copy()
    b[g.start:g.stop] = 0
    assert space.macs(a, 32, 32, 16) == pytest.approx(space.macs(b, 32, 32, 16))
    assert space.macs(a, 32, 32, 16) < dense
    # scaling: conv/linear terms grow with pixels, cross-attention with the text length
    assert space.dense_macs(32, 32, 77) > space.dense_macs(32, 32, 16)
    assert space.dense_macs(64, 64, 16) > 4 * space.dense_macs(32, 32, 16) * 0.99


def test_macs_table_shares(toy):
    _, space = toy
    rows = space.table(32, 32, 16)
    assert len(rows) == len(space.groups)
    assert all(0 < r["macs_share"] < 1 for r in rows)
    width_share = sum(r["macs_share"] for r in rows if r["kind"] in WIDTH_KINDS)
    assert 0.3 < width_share < 1.0
    text = space.format_table(32, 32, 16)
    assert f"D = {space.num_units} units" in text and "down_blocks.1.attentions.0.transformer_blocks.0.attn2" in text


# ------------------------------------------------------------------ gating
def _hooks(unet):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def test_gated_restores_model_even_on_exception(toy):
    unet, space = toy
    x, t, ctx = inputs(TOY, 16, 2, 4, seed=0)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    hooks = _hooks(unet)
    with torch.no_grad():
        y0 = unet(x, t, ctx).sample
        a = space.sample(torch.Generator().manual_seed(5), keep=0.5)
        with space.gated(unet, a):
            y1 = unet(x, t, ctx).sample
        assert rel_err(y0, y1) > 1e-3, "gating must change the output"
        with pytest.raises(RuntimeError, match="boom"):
            with space.gated(unet, a):
                unet(x, t, ctx)
                raise RuntimeError("boom")
        with space.gated(unet, a):
            with pytest.raises(UserError, match="already gated"):
                with space.gated(unet, a):
                    pass
            with pytest.raises(UserError, match="outside"):
                space.materialize(unet, a)
        y2 = unet(x, t, ctx).sample
    assert torch.equal(y0, y2) and _hooks(unet) == hooks
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())


def test_wrapped_unet_is_looked_through(toy):
    unet, space = toy

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel / accelerate look like
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    x, t, ctx = inputs(TOY, 16, 1, 4, seed=2)
    a = space.sample(torch.Generator().manual_seed(9), keep=0.5)
    with torch.no_grad():
        with space.gated(Wrapper(unet), a):
            y_wrapped = unet(x, t, ctx).sample
        with space.gated(unet, a):
            y = unet(x, t, ctx).sample
        assert torch.equal(y, y_wrapped)
        expert = space.materialize(Wrapper(unet), a)
        assert rel_err(y, expert(x, t, ctx).sample) < 1e-5
    assert ArchSpace.from_unet(Wrapper(unet)) == space


def test_gated_per_sample_equals_one_at_a_time_and_is_differentiable(toy):
    unet, space = toy
    x, t, ctx = inputs(TOY, 16, 3, 4, seed=1)
    archs = torch.stack([space.sample(torch.Generator().manual_seed(s), keep=k) for s, k in ((1, 0.9), (2, 0.5), (3, 0.3))])
    with torch.no_grad():
        with space.gated(unet, archs):
            y = unet(x, t, ctx).sample
        for i in range(3):
            with space.gated(unet, archs[i]):
                yi = unet(x[i:i + 1], t[i:i + 1], ctx[i:i + 1]).sample
            assert rel_err(yi[0], y[i]) < 1e-5
        with pytest.raises(UserError, match="rows"):
            with space.gated(unet, archs[:2]):
                unet(x, t, ctx)
    # soft gates: gradients reach the vector, the UNet weights may stay frozen
    soft = torch.full((space.num_units,), 0.7, requires_grad=True)
    for p in unet.parameters():
        p.requires_grad_(False)
    try:
        with space.gated(unet, soft):
            loss = unet(x, t, ctx).sample.square().mean()
        loss.backward()
    finally:
        for p in unet.parameters():
            p.requires_grad_(True)
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert all(bool(soft.grad[g.start:g.stop].abs().sum() > 0) for g in space.groups)


# ------------------------------------------------------------------ SDXL-style UNets (issue 15)
def test_layer_depth_units_options_and_legacy_descriptions():
    multi = ArchSpace.from_config(SDXL_LIKE)  # layer_depth="multi": transformers with > 1 layer
    layers = [g.name for g in multi.depth_groups if g.kind == "layer_depth"]
    assert layers == [f"down_blocks.1.attentions.{j}.transformer_blocks.{k}" for j in range(2) for k in range(2)] \
        + [f"down_blocks.2.attentions.{j}.transformer_blocks.{k}" for j in range(2) for k in range(3)] \
        + [f"mid_block.attentions.0.transformer_blocks.{k}" for k in range(3)] \
        + [f"up_blocks.0.attentions.{j}.transformer_blocks.{k}" for j in range(3) for k in range(3)] \
        + [f"up_blocks.1.attentions.{j}.transformer_blocks.{k}" for j in range(3) for k in range(2)]
    # the layers of a depth-prunable (last) transformer nest in its unit; their widths name both units
    last_t = multi.group("down_blocks.2.attentions.1", "transformer_depth")
    layer = multi.group("down_blocks.2.attentions.1.transformer_blocks.2", "layer_depth")
    heads = multi.group("down_blocks.2.attentions.1.transformer_blocks.2.attn2", "attn_heads")
    assert layer.depth_unit == last_t.start and heads.depth_units == (last_t.start, layer.start)
    assert multi.group("down_blocks.2.attentions.0.transformer_blocks.0", "layer_depth").depth_unit is None
    # effective(): a removed transformer removes its layers and their widths, a removed layer its widths
    a = multi.ones()
    a[last_t.start] = 0
    e = multi.effective(a)
    assert e[layer.start] == 0 and not e[heads.start:heads.stop].any()
    assert multi.macs(e.tolist()) == pytest.approx(multi.macs(a.tolist()))
    # nested MACs: turning the layer off as well removes nothing more
    b = a.clone()
    b[layer.start] = 0
    assert multi.macs(b.tolist()) == pytest.approx(multi.macs(a.tolist()))
    none = ArchSpace.from_config(SDXL_LIKE, layer_depth="none")
    assert none.num_units == multi.num_units - len(layers)
    # SD 1.x: one layer per transformer, so "multi" adds nothing and "all" one unit per transformer (6, mid block included)
    assert ArchSpace.from_config(SD1_LIKE).num_units == ArchSpace.from_config(SD1_LIKE, layer_depth="none").num_units
    assert ArchSpace.from_config(SD1_LIKE, layer_depth="all").num_units == ArchSpace.from_config(SD1_LIKE).num_units + 6
    with pytest.raises(UserError, match="layer_depth"):
        ArchSpace.from_config(SDXL_LIKE, layer_depth="some")
    # round trip, and descriptions written before layer_depth existed read as "none" (same D as then)
    d = json.loads(json.dumps(multi.to_dict()))
    assert ArchSpace.from_dict(d) == multi and d["layer_depth"] == "multi"
    legacy = {k: v for k, v in none.to_dict().items() if k != "layer_depth"}
    assert ArchSpace.from_dict(legacy) == none


def test_sdxl_addition_embedding_is_dense_and_counted():
    space = ArchSpace.from_config(SDXL_ALL, depth_blocks="all")
    per = space.macs_by_module()
    assert per["add_embedding.linear_1"] == 40 * 128 and per["add_embedding.linear_2"] == 128 * 128
    assert not [g for g in space.groups if g.name.startswith("add_")]
    for other in ("text_image", "image"):
        with pytest.raises(UserError, match="addition"):
            ArchSpace.from_config({**SDXL_ALL, "addition_embed_type": other, "encoder_hid_dim": 24})


def test_sdxl_gated_per_sample_and_soft_layer_gates():
    unet = make_unet(SDXL_LIKE, seed=5)
    space = ArchSpace.from_unet(unet)
    x, t, ctx = inputs(SDXL_LIKE, 16, 2, 4, seed=1)
    kw = unet_kwargs(SDXL_LIKE, 2, seed=1)
    archs = torch.stack([space.sample(torch.Generator().manual_seed(s), keep=k) for s, k in ((1, 0.8), (2, 0.4))])
    with torch.no_grad():
        with space.gated(unet, archs):
            y = unet(x, t, ctx, **kw).sample
        for i in range(2):
            kwi = {"added_cond_kwargs": {k: v[i:i + 1] for k, v in kw["added_cond_kwargs"].items()}}
            with space.gated(unet, archs[i]):
                yi = unet(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], **kwi).sample
            assert rel_err(yi[0], y[i]) < 1e-5
    soft = torch.full((space.num_units,), 0.7, requires_grad=True)
    with space.gated(unet, soft):
        unet(x, t, ctx, **kw).sample.square().mean().backward()
    assert all(bool(soft.grad[g.start:g.stop].abs().sum() > 0) for g in space.groups)
