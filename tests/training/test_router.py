"""Router pieces on a hand-made layout: Gumbel-sigmoid STE, architecture-vector normalisation, routing,
inference scores, files, ONNX export."""

import math

import pytest
import torch

from training.gumbel import gumbel_noise, gumbel_sigmoid, hard_gates, keep_min_units
from training.router import ArchLayout, Router, normalized_arch_vectors


def _layout():
    """Units: width group A = 0..3 (in block gated by depth unit 7), width group B = 4..5 (no depth unit),
    width group C = 6 (1 unit, gated by depth unit 8), depth units 7, 8."""
    d = 9
    depth_index = torch.tensor([7, 7, 7, 7, d, d, 8, d, d])
    scale = torch.tensor([0.5] * 4 + [1 / math.sqrt(2)] * 2 + [1.0, 1.0, 1.0])
    return ArchLayout(d, [(0, 4), (4, 6), (6, 7)], depth_index, scale)


def test_gumbel_sigmoid_straight_through_values_and_gradient():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 10, generator=g) * 4).requires_grad_(True)
    noise = gumbel_noise((64, 10), g)
    gates, soft = gumbel_sigmoid(logits, tau=0.4, offset=3.0, noise=noise)
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(gates.detach(), ((logits + noise + 3.0) > 0).float())
    w = torch.randn(64, 10, generator=g)
    (gates * w).sum().backward()
    s = torch.sigmoid((logits.detach() + noise + 3.0) / 0.4)
    assert torch.allclose(logits.grad, w * s * (1 - s) / 0.4, atol=1e-6)


def test_gumbel_gate_probability_matches_theory():
    """P(gate = 1) = P(l + g + b > 0) = 1 - exp(-exp(l + b)) for standard Gumbel g."""
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([-5.0, -3.0, -2.0, 0.0])
    n = 40000
    noise = gumbel_noise((n, 4), g)
    gates, _ = gumbel_sigmoid(logits.expand(n, 4), 0.4, 3.0, noise=noise)
    p = gates.mean(0)
    expect = 1 - torch.exp(-torch.exp(logits + 3.0))
    assert torch.allclose(p, expect, atol=0.01), (p, expect)
    assert abs(noise.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni


def test_hard_gates_without_noise_and_offset():
    logits = torch.tensor([-3.5, -2.9, 0.0, -3.0])
    assert hard_gates(logits, 3.0).tolist() == [0.0, 1.0, 1.0, 0.0]
    gates, _ = gumbel_sigmoid(logits, 0.4, 3.0, noise=None)
    assert gates.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_keep_min_units_fills_empty_groups_from_the_largest_soft_value():
    soft = torch.tensor([[0.1, 0.4, 0.3, 0.2, 0.9, 0.8], [0.6, 0.1, 0.1, 0.1, 0.2, 0.1]])
    hard = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    gates = hard + (soft - soft.detach())
    out = keep_min_units(gates, soft, [(0, 4), (4, 6)], 1)
    assert out.tolist() == [[0.0, 1.0, 0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]]


def test_normalized_arch_vectors_depth_and_group_scaling():
    lay = _layout()
    ones = torch.ones(1, 9)
    v = normalized_arch_vectors(ones, lay.depth_index, lay.unit_scale)
    # group A: 4 units x 1/2 -> squared sum 1; B: 2 x 1/sqrt2 -> 1; C: 1; depth units 1 each -> total 5
    assert torch.allclose(v, (ones * lay.unit_scale) / math.sqrt(5.0))
    assert torch.allclose(v.norm(dim=-1), torch.ones(1))
    # closing depth unit 7 removes group A's contribution although its width gates are open
    closed = ones.clone()
    closed[0, 7] = 0
    v2 = normalized_arch_vectors(closed, lay.depth_index, lay.unit_scale)
    assert torch.equal(v2[0, :4], torch.zeros(4)) and v2[0, 7] == 0
    assert torch.allclose((v2[0] ** 2).sum(), torch.tensor(1.0))
    # the scaling makes a group count by its kept fraction, not its unit count
    half_a = ones.clone()
    half_a[0, 0:2] = 0
    half_b = ones.clone()
    half_b[0, 4] = 0
    na = normalized_arch_vectors(half_a, lay.depth_index, lay.unit_scale)
    nb = normalized_arch_vectors(half_b, lay.depth_index, lay.unit_scale)
    assert torch.allclose(na @ v.t(), nb @ v.t())


def test_router_init_routing_and_inference_scores_agree():
    lay = _layout()
    r = Router(lay, embed_dim=5, num_experts=3, seed=0)
    w = r.predictor.weight.detach()
    assert torch.allclose(w.t() @ w, torch.eye(5), atol=1e-5)  # orthogonal columns (D > E)
    c = r.codes.detach()
    assert torch.allclose(c @ c.t(), torch.eye(3), atol=1e-5)  # orthonormal codes
    assert torch.equal(r.predictor.bias.detach(), torch.zeros(9))
    with torch.no_grad():
        r.codes.copy_(torch.tensor([[5.0] * 9, [-9.0] * 4 + [5.0] * 5, [5.0] * 6 + [-9.0, 5.0, -9.0]]))
        r.predictor.weight.copy_(torch.randn(9, 5) * 6)
    z = torch.nn.functional.normalize(torch.randn(50, 5), dim=-1)
    scores = r.inference_scores(z)
    assert scores.shape == (50, 3)
    # the same computation spelled out with the training-time pieces (no noise)
    pg, _ = gumbel_sigmoid(r.predict(z), r.tau, r.offset, noise=None)
    expect = r.arch_vectors(pg) @ r.code_vectors().t()
    assert torch.allclose(scores, expect, atol=1e-6)
    assert torch.equal(r.route(z), expect.argmax(1))
    assert r.expert_gates()[1, :4].sum() == 1  # min_width_units keeps one unit of group A


def test_router_save_load_roundtrip(tmp_path):
    lay = _layout()
    r = Router(lay, embed_dim=5, num_experts=4, seed=3)
    with torch.no_grad():
        r.codes.add_(torch.randn(4, 9) * 4)
        r.predictor.bias.add_(torch.randn(9))
        r.code_bias.copy_(torch.randn(4) * 0.1)
    r.save(tmp_path, extra={"budget": 0.5})
    for f in ("router.safetensors", "codes.safetensors", "router.json"):
        assert (tmp_path / f).is_file()
    r2 = Router.load(tmp_path)
    for a, b in zip(r.state_dict().values(), r2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(r.code_bias, r2.code_bias)
    z = torch.nn.functional.normalize(torch.randn(16, 5), dim=-1)
    assert torch.equal(r.inference_scores(z), r2.inference_scores(z))
    from safetensors.torch import load_file

    codes = load_file(str(tmp_path / "codes.safetensors"))
    assert torch.equal(codes["gates"], r.expert_gates())


def test_router_scorer_exports_to_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    lay = _layout()
    r = Router(lay, embed_dim=5, num_experts=3, seed=1)
    with torch.no_grad():
        r.codes.add_(torch.randn(3, 9) * 4)
        r.predictor.weight.mul_(8)
        r.code_bias.copy_(torch.tensor([0.05, -0.02, 0.01]))
    scorer = r.scorer().eval()
    z = torch.nn.functional.normalize(torch.randn(7, 5), dim=-1)
    path = tmp_path / "router.onnx"
    torch.onnx.export(scorer, (z,), str(path), input_names=["embeddings"], output_names=["scores"],
                      dynamic_axes={"embeddings": {0: "batch"}, "scores": {0: "batch"}}, dynamo=False)
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    z2 = torch.nn.functional.normalize(torch.randn(11, 5), dim=-1)
    got = sess.run(None, {"embeddings": z2.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), r.inference_scores(z2), atol=1e-5)


def test_codes_from_predictor_kmeans_recovers_prompt_clusters():
    torch.manual_seed(0)
    lay = _layout()
    r = Router(lay, embed_dim=6, num_experts=3, seed=0)
    with torch.no_grad():
        r.predictor.weight.copy_(torch.randn(9, 6) * 8)
    centres = torch.nn.functional.normalize(torch.randn(3, 6), dim=-1)
    truth = torch.arange(60) % 3
    z = torch.nn.functional.normalize(centres[truth] + 0.002 * torch.randn(60, 6), dim=-1)
    a = r.init_codes_from_predictor_(z, torch.Generator().manual_seed(1))
    # every true cluster maps to one code, different clusters to different codes (if their gates differ)
    pred_vec = r.arch_vectors(r.gates(r.predict(centres), None))
    distinct = len({tuple(v.tolist()) for v in pred_vec})
    mapping = {int(t): set(a[truth == t].tolist()) for t in range(3)}
    assert all(len(v) == 1 for v in mapping.values())
    assert len(set().union(*mapping.values())) == distinct
    # each code is the mean logit vector of its members, and routing sends members back to it
    for j in a.unique().tolist():
        assert torch.allclose(r.codes[j], r.predict(z[a == j]).mean(0), atol=1e-5)
    assert torch.equal(r.route(z), a) or distinct < 3
    # deterministic for a generator seed
    r2 = Router(lay, embed_dim=6, num_experts=3, seed=0)
    with torch.no_grad():
        r2.predictor.weight.copy_(r.predictor.weight)
    assert torch.equal(r2.init_codes_from_predictor_(z, torch.Generator().manual_seed(1)), a)
    # fewer distinct prompts than codes: a cluster stays empty and its code is a real prompt's logits (it
    # indexed the logits with a unit of the centre vector, an IndexError past N prompts, before)
    same = z[:1].repeat(4, 1)
    r.init_codes_from_predictor_(same, torch.Generator().manual_seed(2))
    for j in range(3):
        assert torch.allclose(r.codes[j], r.predict(same[:1])[0], atol=1e-5)
