"""Benchmark helpers: onnxruntime per-operator profiles and the SD latency summary."""

from __future__ import annotations

import numpy as np
import pytest


def _conv_graph(path, cin: int, cout: int, side: int, seed: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.1).astype(np.float32), "W")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Conv", ["r", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, side, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, cout, side, side])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_profile_graph_accounts_the_nodes_of_each_call(tmp_path):
    from benchmarks.ort_profile import compare_profiles, profile_graph

    feeds = {"x": np.random.default_rng(0).standard_normal((2, 32, 24, 24), dtype=np.float32)}
    small = profile_graph(_conv_graph(tmp_path / "a.onnx", 32, 16, 24, 0), feeds, runs=5, threads=1)
    big = profile_graph(_conv_graph(tmp_path / "b.onnx", 32, 128, 24, 1), feeds, runs=5, threads=1)
    for p in (small, big):
        assert p["runs"] == 5 and p["total_ms"] > 0
        assert 0 < p["node_ms"] <= p["total_ms"] * 1.5  # medians of node events inside the timed calls
        conv = [k for k in p["by_op"] if "Conv" in k]
        assert conv, p["by_op"]
        assert sum(p["count_by_op"][k] for k in conv) == 1  # one convolution per call, not per profiled run
        assert p["nodes"][0]["ms"] == max(n["ms"] for n in p["nodes"])
    conv_key = max(big["by_op"], key=big["by_op"].get)
    assert "Conv" in conv_key  # 8x the output channels: the convolution dominates
    rows = compare_profiles({"dense": big, "small": small}, reference="dense")
    assert rows[-1]["op"] == "(other)"
    assert sum(r["dense_ms"] for r in rows) == pytest.approx(big["node_ms"], rel=1e-9)
    assert sum(r["share_of_dense"] for r in rows) == pytest.approx(1.0, rel=1e-9)
    conv_row = next(r for r in rows if r["op"] == conv_key)
    small_conv = sum(v for k, v in small["by_op"].items() if k == conv_key)
    assert conv_row["small_ratio"] == pytest.approx(small_conv / big["by_op"][conv_key], rel=1e-9)


def test_summary_rows_flags_latency_against_macs_and_speedup():
    from benchmarks.sd21_latency import LAT_TOLERANCE, summary_rows

    def row(name, backend, macs_f, ms, dense_ms, s=0):
        return {"expert": name, "backend": backend, "macs_fraction": macs_f, "macs": macs_f * 1e11, "params": 1e6,
                "latency_ms_median": ms, "latency_fraction": ms / dense_ms, "set": s}

    rows = [row("dense", "onnxruntime", 1.0, 100, 100, 0), row("a", "onnxruntime", 0.5, 50 * LAT_TOLERANCE * 0.99, 100),
            row("dense", "onnxruntime", 1.0, 110, 110, 1), row("b", "onnxruntime", 0.6, 0.6 * 110 * LAT_TOLERANCE * 1.01,
                                                               110, 1),
            row("c", "onnxruntime", 0.95, 120, 100),
            row("dense", "torch", 1.0, 300, 300), row("a", "torch", 0.5, 110, 300), row("b", "torch", 0.6, 120, 300)]
    s = {d["model"]: d for d in summary_rows(rows)}
    assert s["dense"]["onnxruntime_ms"] == pytest.approx(105)  # two interleaved sets: averaged
    assert s["a"]["latency_ok"] is True and s["b"]["latency_ok"] is False
    assert "latency_ok" not in s["c"] and "latency_ok" not in s["dense"]  # MACs fraction > 0.9 / the reference
    assert s["a"]["speedup"] == pytest.approx(110 / (50 * LAT_TOLERANCE * 0.99))
    assert s["a"]["speedup_ok"] is True and s["b"]["speedup_ok"] is False
    assert "speedup" not in s["c"]


def test_paired_estimators_cancel_a_slowdown_shared_by_a_round():
    from benchmarks.unet_latency import paired_timings

    rng = np.random.default_rng(0)
    load = 1.0 + 2.0 * rng.random(9)  # the machine's slowdown per round, shared by both models
    calls = {"dense": [(99.0, 9.0)] + [(1.0 * f, 1.0) for f in load],  # one warm-up call, then 9 rounds
             "e": [(99.0, 9.0)] + [(0.4 * f, 0.4 + 0.01 * i) for i, f in enumerate(load)]}
    p = paired_timings(calls, warmup=1)
    assert p["e"]["latency_fraction_paired"] == pytest.approx(0.4)
    assert p["e"]["latency_fraction_min"] == pytest.approx(0.4)
    assert p["e"]["cpu_fraction"] == pytest.approx(0.44)
    assert p["e"]["cpu_ms_median"] == pytest.approx(440.0)
    assert p["dense"]["latency_fraction_paired"] == pytest.approx(1.0)


@pytest.fixture
def torch_threads_restored():
    import torch

    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_bench_unets_rows_carry_the_fractions_and_paired_estimators(torch_threads_restored):
    import torch
    from arch_testkit import CONFIGS, make_unet

    from aptp_export import ArchSpace
    from benchmarks.unet_latency import PAIRED_KEYS, InputShape, ModelUnderTest, bench_unets

    torch.set_num_threads(2)
    seen = []
    config, depth_blocks, side = CONFIGS["toy"]
    unet = make_unet(config, seed=0)
    space = ArchSpace.from_unet(unet, depth_blocks=depth_blocks)
    arch = space.sample(torch.Generator().manual_seed(0), keep=0.5)
    dense_macs = space.dense_macs(side, side, 4)
    macs = space.macs(arch.tolist(), side, side, 4)
    def load_dense():
        seen.append(torch.get_num_threads())  # loaded inside the timed section
        return unet

    models = [ModelUnderTest("dense", dense_macs, 1.0, load_torch=load_dense),
              ModelUnderTest("e", macs, macs / dense_macs, load_torch=lambda: space.materialize(unet, arch))]
    rows = bench_unets(models, InputShape(3, side, side, 4, config["cross_attention_dim"]), [1], ["torch"],
                       warmup=1, repeats=3, threads=1)
    assert seen == [1] and torch.get_num_threads() == 2  # timed with --threads, restored afterwards
    assert [r["expert"] for r in rows] == ["dense", "e"]
    for r in rows:
        assert r["batch"] == 2 and r["repeats"] == 3
        for k in ("macs_fraction", "latency_ms_median", "latency_fraction", *PAIRED_KEYS):
            assert np.isfinite(r[k]) and r[k] > 0, k
    assert rows[0]["latency_fraction"] == rows[0]["latency_fraction_paired"] == 1.0


def test_summary_rows_prefers_the_paired_speedup():
    from benchmarks.sd21_latency import summary_rows

    rows = [{"expert": n, "backend": b, "macs_fraction": f, "macs": f, "params": 1, "latency_ms_median": ms,
             "latency_fraction": ms / d} for n, b, f, ms, d in
            [("dense", "onnxruntime", 1.0, 100, 100), ("e", "onnxruntime", 0.5, 50, 100),
             ("dense", "torch", 1.0, 300, 300), ("e", "torch", 0.5, 150, 300)]]
    s = {d["model"]: d for d in summary_rows(rows, [{"expert": "e", "speedup_paired": 1.5, "speedup_min": 1.4}])}
    assert s["e"]["speedup"] == pytest.approx(3.0) and s["e"]["speedup_paired"] == 1.5
    assert s["e"]["speedup_ok"] is False  # the same-round figure decides
    assert s["dense"]["speedup_ok"] is True  # no paired figure: the ratio of medians


@pytest.mark.parametrize("repeats,block,settle", [(10, 1, 0), (10, 3, 1), (7, 3, 2)])
def test_interleaved_runs_models_in_blocks_with_untimed_settle_calls(repeats, block, settle):
    from benchmarks.timing import interleaved

    log = []
    timed = {k: (lambda k=k: log.append((k, "t"))) for k in ("dense", "e")}
    untimed = {k: (lambda k=k: log.append((k, "u"))) for k in ("dense", "e")}
    t = interleaved(timed, warmup=1, repeats=repeats, settle=settle, untimed=untimed, block=block)
    assert t["dense"].repeats == t["e"].repeats == repeats
    assert log[:2] == [("dense", "u"), ("e", "u")]  # warm-up goes through the untimed callables
    body = log[2:]
    expected = []
    for r in range(0, repeats, block):
        for k in ("dense", "e"):
            expected += [(k, "u")] * settle + [(k, "t")] * min(block, repeats - r)
    assert body == expected
