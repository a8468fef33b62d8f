"""Property test: gated dense UNet == physically pruned UNet, and analytic MACs == measured MACs.

For every small UNet configuration (toy teacher; SD-1-like; SD-2-like 4 levels; GroupNorm-32 with every block
depth-prunable; two SDXL-style with the text_time addition embedding, several transformer layers per block and
layer depth units, nested in transformer units in one; two SD-1.5-style with 8 heads at every level) with random
non-default weights, and for a suite of architecture vectors (all ones; keep ratios
0.2-1.0; whole blocks dropped; whole width groups emptied; all but one head; no depth unit kept), on fresh
random inputs:
  - relative error between gated and materialised outputs <= 1e-5 (float32);
  - all-ones: bit-identical outputs and identical parameter count;
  - space.macs(arch) within 0.5 % of torch's FlopCounterMode / 2 on the materialised model (classic
    AttnProcessor, so the attention products are counted), per sample.
The default run uses 8 vectors per configuration; `-m slow` runs 40 per configuration (the issue-15 acceptance
asks for >= 20 per SDXL- and SD-1.5-style configuration).
"""

from __future__ import annotations

import pytest
import torch
from arch_testkit import ALL_CONFIGS, arch_suite, inputs, make_unet, rel_err, unet_kwargs
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from aptp_export import ArchSpace

pytestmark = pytest.mark.usefixtures("one_thread")

REL_TOL = 1e-5
MACS_TOL = 0.005
_MODELS: dict = {}



def _model(name):
    if name not in _MODELS:
        cfg, depth_blocks, side = ALL_CONFIGS[name]
        unet = make_unet(cfg, seed=len(_MODELS) + 1)
        unet.set_attn_processor(AttnProcessor())  # counted by FlopCounterMode (SDPA is not)
        _MODELS[name] = (cfg, unet, ArchSpace.from_unet(unet, depth_blocks=depth_blocks), side)
    return _MODELS[name]


def _sweep(name: str, n_vectors: int, seed: int) -> dict:
    cfg, unet, space, side = _model(name)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    worst = {"rel": 0.0, "macs": 0.0}
    for i, (label, a) in enumerate(arch_suite(space, n_vectors, seed)):
        batch, text_len = 2, 3 + (i % 5)
        x, t, ctx = inputs(cfg, side, batch, text_len, seed=1000 * seed + i)
        kw = unet_kwargs(cfg, batch, seed=1000 * seed + i)
        with torch.no_grad():
            with space.gated(unet, a):
                y_masked = unet(x, t, ctx, **kw).sample
            expert = space.materialize(unet, a)
            with FlopCounterMode(display=False) as fc:
                y_pruned = expert(x, t, ctx, **kw).sample
        err = rel_err(y_masked, y_pruned)
        assert err <= REL_TOL, f"{name} {label}: masked vs materialised rel. error {err:.3g}"
        measured = fc.get_total_flops() / 2 / batch
        predicted = space.macs(a.tolist(), side, side, text_len)
        dev = abs(predicted - measured) / measured
        assert dev <= MACS_TOL, f"{name} {label}: analytic {predicted:.0f} vs measured {measured:.0f} MACs"
        if label == "ones":
            with torch.no_grad():
                y_dense = unet(x, t, ctx, **kw).sample
            assert torch.equal(y_dense, y_pruned) and torch.equal(y_dense, y_masked)
            assert sum(p.numel() for p in expert.parameters()) == sum(p.numel() for p in unet.parameters())
        worst["rel"] = max(worst["rel"], err)
        worst["macs"] = max(worst["macs"], dev)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "materialize modified its input"
    return worst


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_masked_equals_materialised_light(name):
    torch.manual_seed(0)
    worst = _sweep(name, n_vectors=8, seed=1)
    print(f"{name}: max rel err {worst['rel']:.2e}, max MACs deviation {100 * worst['macs']:.4f} %")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_masked_equals_materialised_sweep(name):
    torch.manual_seed(0)
    worst = _sweep(name, n_vectors=40, seed=2)
    print(f"{name}: 40 vectors, max rel err {worst['rel']:.2e}, max MACs deviation {100 * worst['macs']:.4f} %")
