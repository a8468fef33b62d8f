"""Experts as files (arch.json + model.safetensors) and the `aptp inspect` verb."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from arch_testkit import SD1_LIKE, SDXL_LIKE, TOY, inputs, make_unet, unet_kwargs

from aptp import cli
from aptp_export import ArchSpace, UserError, load_expert, save_expert
from aptp_export.expert_io import read_expert_info
from aptp_export.unit_kinds import ConstantAttention, ResnetShortcut, TransformerLayerSkip, TransformerSkip

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def base():
    unet = make_unet(SD1_LIKE, seed=7)
    space = ArchSpace.from_unet(unet)
    rng = np.random.default_rng(0)
    a = (rng.random(space.num_units) < 0.6).astype(np.float32)
    depth = space.depth_groups
    a[depth[0].start] = 0  # a whole ResBlock removed
    a[depth[1].start] = 0  # a whole transformer removed
    kept_attn = next(g for g in space.width_groups if g.kind == "attn_heads" and g.depth_unit != depth[1].start)
    a[kept_attn.start:kept_attn.stop] = 0  # an attention with no head left
    arch = torch.from_numpy(a)
    return unet, space, arch, space.materialize(unet, arch)


def test_round_trip_is_bit_exact(base, tmp_path):
    unet, space, arch, expert = base
    out = save_expert(tmp_path / "expert_00", space, arch, expert, text_len=5, metadata={"expert": 0})
    assert (out / "arch.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left"
    info = json.loads((out / "arch.json").read_text())
    assert info["arch"] == [int(x) for x in arch.tolist()] and info["metadata"] == {"expert": 0}
    assert info["params"] == sum(p.numel() for p in expert.parameters()) < space.dense_params
    assert info["macs"]["macs"] == pytest.approx(space.macs(arch.tolist(), text_len=5))
    loaded = load_expert(out)
    kinds = {type(m) for m in loaded.modules()}
    assert {ResnetShortcut, TransformerSkip, ConstantAttention} <= kinds
    s1, s2 = expert.state_dict(), loaded.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) and s1[k].dtype == s2[k].dtype for k in s1)
    x, t, ctx = inputs(SD1_LIKE, 8, 2, 4, seed=3)
    with torch.no_grad():
        assert torch.equal(expert(x, t, ctx).sample, loaded(x, t, ctx).sample)
    space2, arch2, _ = read_expert_info(out / "arch.json")
    assert space2 == space and torch.equal(arch2, arch)


def test_all_ones_expert_round_trip(tmp_path):
    unet = make_unet(TOY, seed=2)
    space = ArchSpace.from_unet(unet)
    expert = space.materialize(unet, space.ones())
    loaded = load_expert(save_expert(tmp_path / "dense", space, space.ones(), expert, text_len=16))
    s0 = unet.state_dict()
    assert all(torch.equal(s0[k], v) for k, v in loaded.state_dict().items()) and s0.keys() == loaded.state_dict().keys()


def test_vector_not_matching_weights_fails_naming_the_file(base, tmp_path):
    unet, space, arch, expert = base
    out = save_expert(tmp_path / "e", space, arch, expert)
    info = json.loads((out / "arch.json").read_text())
    g = next(g for g in space.width_groups if 0 < sum(info["arch"][g.start:g.stop]) < g.num_units)
    i = g.start + info["arch"][g.start:g.stop].index(0)
    info["arch"][i] = 1  # one more unit than the weights have
    (out / "arch.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=r"model\.safetensors.*do not match the architecture vector in .*arch\.json"):
        load_expert(out)
    # saving an expert under another vector is refused too
    with pytest.raises(UserError, match="does not match its architecture vector"):
        save_expert(tmp_path / "f", space, torch.tensor(info["arch"], dtype=torch.float32), expert)


def test_bad_expert_files(base, tmp_path):
    unet, space, arch, expert = base
    with pytest.raises(UserError, match="no such file"):
        load_expert(tmp_path / "missing")
    out = save_expert(tmp_path / "e", space, arch, expert)
    info = json.loads((out / "arch.json").read_text())
    (out / "arch.json").write_text("{not json")
    with pytest.raises(UserError, match="arch.json"):
        load_expert(out)
    (out / "arch.json").write_text(json.dumps({**info, "arch": info["arch"][:-1]}))
    with pytest.raises(UserError, match="entries"):
        load_expert(out)
    (out / "arch.json").write_text(json.dumps({**info, "arch": [2] * len(info["arch"])}))
    with pytest.raises(UserError, match="0/1"):
        load_expert(out)
    (out / "arch.json").write_text(json.dumps(info))
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="model.safetensors"):
        load_expert(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no such file"):
        load_expert(out)
    with pytest.raises(UserError, match="one architecture vector"):
        space.materialize(unet, arch.repeat(2, 1))


def test_materialize_is_independent_of_the_base(base):
    unet, space, arch, expert = base
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(1.0)  # training the expert must never touch the dense model
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    with torch.no_grad():
        for p in expert.parameters():
            p.sub_(1.0)


def test_inspect_cli(capsys, tmp_path):
    assert cli.main(["inspect", "--sd21"]) == 0
    out = capsys.readouterr().out
    assert "D = 1620 units" in out and "1074.553 GMACs" in out and "up_blocks.3.attentions.2" in out
    assert cli.main(["inspect", "--sdxl", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["num_units"] == 5464 and any(r["kind"] == "layer_depth" for r in rows["groups"])
    assert cli.main(["inspect", "--sd15"]) == 0
    assert "D = 1486 units" in capsys.readouterr().out
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **SD1_LIKE}))
    assert cli.main(["inspect", "--unet", str(tmp_path), "--depth-blocks", "all", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["num_units"] == ArchSpace.from_config(SD1_LIKE, depth_blocks="all").num_units
    assert cli.main(["inspect", "--unet", str(tmp_path / "nowhere")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_sdxl_expert_round_trip_is_bit_exact(tmp_path):
    """SDXL-style: a removed transformer layer, a removed transformer (its nested layers go with it)."""
    unet = make_unet(SDXL_LIKE, seed=3)
    space = ArchSpace.from_unet(unet)
    a = space.sample(torch.Generator().manual_seed(4), keep=0.7)
    for g in space.depth_groups:
        a[g.start] = 1.0
    a[space.group("mid_block.attentions.0.transformer_blocks.1", "layer_depth").start] = 0
    a[space.group("down_blocks.2.attentions.1", "transformer_depth").start] = 0
    expert = space.materialize(unet, a)
    out = save_expert(tmp_path / "xl", space, a, expert, text_len=5)
    assert json.loads((out / "arch.json").read_text())["space"]["layer_depth"] == "multi"
    loaded = load_expert(out)
    assert TransformerLayerSkip in {type(m) for m in loaded.modules()}
    assert isinstance(loaded.get_submodule("down_blocks.2.attentions.1"), TransformerSkip)
    s1, s2 = expert.state_dict(), loaded.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    x, t, ctx = inputs(SDXL_LIKE, 16, 2, 5, seed=3)
    kw = unet_kwargs(SDXL_LIKE, 2, seed=3)
    with torch.no_grad():
        assert torch.equal(expert(x, t, ctx, **kw).sample, loaded(x, t, ctx, **kw).sample)
