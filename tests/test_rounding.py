"""round_units (kept channels up to hardware multiples) and pad_expert (same function, rounded widths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from arch_testkit import CONFIGS, arch_suite, inputs, make_unet, one_thread

from aptp_export import ArchSpace
from aptp_export.errors import UserError
from aptp_export.rounding import pad_expert, round_units, rounding_summary

_single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

MULTIPLES = (2, 3, 7, 8, 16)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    config, depth_blocks, side = CONFIGS[request.param]
    unet = make_unet(config, seed=11)
    return config, side, unet, ArchSpace.from_unet(unet, depth_blocks=depth_blocks)


def _block_alive(g, keep) -> bool:
    return g.depth_unit is None or bool(keep[g.depth_unit])


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
