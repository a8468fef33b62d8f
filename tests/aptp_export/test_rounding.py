"""round_units (kept channels up to hardware multiples) and pad_expert (same function, rounded widths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from arch_testkit import CONFIGS, arch_suite, inputs, make_unet

from aptp_export import ArchSpace
from aptp_export.rounding import pad_expert, round_units, rounding_summary
from engines.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


MULTIPLES = (2, 3, 7, 8, 16)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    config, depth_blocks, side = CONFIGS[request.param]
    unet = make_unet(config, seed=11)
    return config, side, unet, ArchSpace.from_unet(unet, depth_blocks=depth_blocks)


def _block_alive(g, keep) -> bool:
    return not g.removed(keep)


def test_round_units_keeps_every_unit_reaches_the_smallest_multiple_and_never_lowers_macs(case):
    config, side, _, space = case
    for name, arch in arch_suite(space, 14, seed=5):
        a = arch.numpy() > 0.5
        for m in MULTIPLES:
            r = round_units(space, arch, m)
            assert r.dtype == torch.float32 and r.shape == arch.shape
            rb = r.numpy() > 0.5
            assert not (a & ~rb).any(), f"{name}, multiple {m}: a unit was dropped"
            for g in space.depth_groups:
                assert rb[g.start] == a[g.start]
            for g in space.width_groups:
                k, kr = int(a[g.start:g.stop].sum()), int(rb[g.start:g.stop].sum())
                if not _block_alive(g, a) or k == 0:
                    assert kr == k, f"{name}: {g.name} is gone or empty and must stay as it is"
                    continue
                reachable = [n for n in range(k, g.num_units + 1) if (n * g.unit_channels) % m == 0]
                expected = reachable[0] if reachable else k
                assert kr == expected, (f"{name}, multiple {m}: {g.name} keeps {kr} units of "
                                        f"{g.unit_channels} channels, expected {expected}")
                if reachable:
                    assert (kr * g.unit_channels) % m == 0
            macs, macs_r = space.macs(arch.tolist(), side, side, 7), space.macs(r.tolist(), side, side, 7)
            assert macs_r >= macs * (1 - 1e-12)
            if (rb != a).any():
                assert macs_r > macs, f"{name}: units were added but MACs did not grow"
            s = rounding_summary(space, arch, r, m)
            assert s["units_added"] == int((rb & ~a).sum())


def test_round_units_by_one_is_the_identity_and_idempotent():
    config, depth_blocks, _ = CONFIGS["toy"]
    space = ArchSpace.from_config(config, depth_blocks=depth_blocks)
    for _, arch in arch_suite(space, 8, seed=2):
        assert torch.equal(round_units(space, arch, 1), (arch > 0.5).float())
        r = round_units(space, arch, 8)
        assert torch.equal(round_units(space, r, 8), r)


def test_round_units_rejects_bad_multiples_and_vectors():
    config, depth_blocks, _ = CONFIGS["toy"]
    space = ArchSpace.from_config(config, depth_blocks=depth_blocks)
    arch = space.sample(torch.Generator().manual_seed(0), keep=0.5)
    for bad in (0, -8, 2.5, True, "8"):
        with pytest.raises(UserError):
            round_units(space, arch, bad)
    with pytest.raises(UserError):
        round_units(space, arch[:-1], 8)
    with pytest.raises(UserError):
        round_units(space, torch.stack([arch, arch]), 8)


def test_pad_expert_computes_what_the_expert_computes_with_the_rounded_shapes(case):
    config, side, unet, space = case
    suite = arch_suite(space, 7, seed=9)[2:]
    rounded_any = 0
    for i, (name, arch) in enumerate(suite):
        m = (8, 16, 3, 7)[i % 4]
        expert = space.materialize(unet, arch)
        # a fine-tuned expert's weights differ from the dense ones: perturb them (padding must not care)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn_like(p))
        before = {k: v.clone() for k, v in expert.state_dict().items()}
        rounded = round_units(space, arch, m)
        padded = pad_expert(space, expert, arch, rounded)
        reference = space.materialize(unet, rounded)
        assert {k: v.shape for k, v in padded.state_dict().items()} == \
               {k: v.shape for k, v in reference.state_dict().items()}, name
        x, t, ctx = inputs(config, side, 2, 5, seed=100 + i)
        with torch.no_grad():
            y = expert(x, t, ctx).sample
            y_pad = padded(x, t, ctx).sample
        err = float((y - y_pad).abs().max() / y.abs().max())
        assert err < 1e-5, f"{name}, multiple {m}: padded expert differs by {err:.2e}"
        assert all(torch.equal(before[k], v) for k, v in expert.state_dict().items()), "expert was modified"
        if (rounded != (arch > 0.5).float()).any():
            rounded_any += 1
            assert sum(p.numel() for p in padded.parameters()) > sum(p.numel() for p in expert.parameters())
    assert rounded_any >= 2, "the suite must exercise actual padding"


def test_pad_expert_refuses_a_vector_that_drops_units():
    config, depth_blocks, _ = CONFIGS["toy"]
    unet = make_unet(config, seed=1)
    space = ArchSpace.from_unet(unet, depth_blocks=depth_blocks)
    arch = space.sample(torch.Generator().manual_seed(3), keep=0.7)
    expert = space.materialize(unet, arch)
    fewer = arch.clone()
    fewer[int(np.nonzero(arch.numpy())[0][0])] = 0.0
    with pytest.raises(UserError):
        pad_expert(space, expert, arch, fewer)


@pytest.mark.slow
def test_export_run_round_to_writes_padded_experts_that_match_the_run(tmp_path):
    """`aptp export --round-to 8`: the manifest's MACs are the rounded vectors', each expert graph computes
    what the fine-tuned (unrounded) torch expert computes."""
    import onnxruntime as ort
    from prune_fixtures import tiny_config, write_toy_model

    from aptp_export.expert_io import load_expert, read_expert_info
    from training.config import config_from_dict
    from training.export_run import export_run
    from training.finetune import run_finetune
    from training.prune import run_prune
    from training.rundir import RunDir

    model = write_toy_model(tmp_path / "model", seed=4)
    cfg = tiny_config(model, tmp_path / "runs", prune={"steps": 4, "warmup_steps": 1, "budget": 0.5},
                      finetune={"steps": 1, "batch_size": 4})
    run_dir = tmp_path / "run"
    run_prune(config_from_dict(cfg), run_dir, progress=False)
    run_finetune(run_dir, progress=False)
    # a few pruning steps leave every expert dense: overwrite two experts with random materialised ones
    from diffusers import UNet2DConditionModel

    from aptp_export.expert_io import save_expert

    base = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    space = ArchSpace.from_unet(base)
    for i, keep in ((1, 0.5), (2, 0.7)):
        arch = space.sample(torch.Generator().manual_seed(i), keep=keep)
        save_expert(RunDir(run_dir).expert(i), space, arch, space.materialize(base, arch))
    manifest, _ = export_run(run_dir, tmp_path / "engines", progress=False, round_to=8)
    padded_any = 0
    for e in manifest.experts:
        space, arch, _ = read_expert_info(RunDir(run_dir).expert(e.id))
        rounded = round_units(space, arch, 8)
        padded_any += bool((rounded != (arch > 0.5).float()).any())
        h, w = manifest.sample_size
        assert e.macs == pytest.approx(space.macs(rounded.tolist(), h, w, manifest.text_len), rel=1e-9)
        expert = load_expert(RunDir(run_dir).expert(e.id)).eval()
        g = torch.Generator().manual_seed(e.id)
        x = torch.randn(2, manifest.in_channels, h, w, generator=g)
        t = torch.tensor([10.0, 700.0])
        ctx = torch.randn(2, manifest.text_len, manifest.text_encoder.hidden_size, generator=g)
        with torch.no_grad():
            ref = expert(x, t, ctx).sample.numpy()
        sess = ort.InferenceSession(str(tmp_path / "engines" / e.files["onnx"].path), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feeds = dict(zip(("sample", "timestep", "encoder_hidden_states"), (x.numpy(), t.numpy(), ctx.numpy()),
                         strict=True))
        out = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4
    assert padded_any >= 2, "no expert needed rounding: the test exercises nothing"
