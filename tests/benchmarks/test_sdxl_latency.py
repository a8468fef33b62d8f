"""benchmarks.sdxl_latency and benchmarks.memwatch: SDXL feeds, the model plan, rows against a reference,
peak RSS per phase and the watchdog that stops a child over its memory limit (seconds, no SDXL built)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from arch_testkit import SDXL_LIKE

from aptp_export import ArchSpace
from benchmarks.memwatch import Phases, read_progress, run_watched
from benchmarks.sdxl_latency import (
    phase_peaks,
    plan_models,
    reference_model,
    sdxl_shape,
    sdxl_spec,
    timing_rows,
)
from benchmarks.unet_latency import InputShape, unet_feeds

REPO = Path(__file__).resolve().parents[2]


def test_unet_feeds_sdxl_inputs():
    feeds = unet_feeds(sdxl_shape(SDXL_LIKE, 16), prompts=1)
    assert {k: v.shape for k, v in feeds.items()} == {
        "sample": (2, 4, 16, 16), "timestep": (2,), "encoder_hidden_states": (2, 77, 40),
        "text_embeds": (2, 12), "time_ids": (2, 6)}
    np.testing.assert_array_equal(feeds["time_ids"][1], [128, 128, 0, 0, 128, 128])  # 8 x latent px
    assert set(unet_feeds(InputShape(4, 8, 8, 77, 32), 1)) == {"sample", "timestep", "encoder_hidden_states"}
    spec = sdxl_spec(SDXL_LIKE, 16)  # same inputs as the graph the feeds are for
    assert list(spec.input_names) == list(feeds)


def test_plan_models_smallest_first_dense_last():
    space = ArchSpace.from_config(SDXL_LIKE)
    models = plan_models(space, [0.9, 0.5, 0.7], seed=0)
    assert set(models) == {"keep_0.50", "keep_0.70", "keep_0.90", "dense"} and list(models)[-1] == "dense"
    sizes = [float(a.sum()) for a in models.values() if a is not None]
    assert sizes == sorted(sizes) and models["dense"] is None
    assert "dense" not in plan_models(space, [0.5], seed=0, dense=False)


def test_timing_rows_against_dense_or_largest_expert():
    macs = {"dense": 100.0, "a": 80.0, "b": 40.0}
    calls = {"dense": [(2.0, 2.0), (2.2, 2.1), (2.0, 2.0)], "a": [(1.6, 1.6)] * 3, "b": [(0.9, 0.8), (1.0, 1.0), (1.1, 1.0)]}
    rows = {r["expert"]: r for r in timing_rows(calls, macs, 100.0, {"a": 5}, 64)}
    assert rows["b"]["reference"] == "dense"
    assert rows["b"]["latency_fraction"] == pytest.approx(1000.0 / 2000.0)
    assert rows["b"]["latency_over_macs"] == pytest.approx(0.5 / 0.4)
    assert rows["a"]["params"] == 5 and rows["dense"]["latency_fraction"] == 1.0
    del calls["dense"]
    assert reference_model(list(calls), macs) == "a"
    rows = {r["expert"]: r for r in timing_rows(calls, macs, 100.0, {}, 64)}
    assert rows["b"]["macs_fraction"] == pytest.approx(0.4)           # still against the dense MACs
    assert rows["b"]["latency_fraction"] == pytest.approx(1000.0 / 1600.0)
    assert rows["b"]["latency_over_macs"] == pytest.approx((1.0 / 1.6) / 0.5)  # both against "a"


def test_phases_record_peak_per_phase(tmp_path):
    phases = Phases(tmp_path / "p.json", model="m")
    with phases("small"):
        pass
    with phases("big") as rec:
        blob = b"\x01" * 200_000_000
        rec["n"] = len(blob)
        del blob
    small, big = phases.records
    assert big["peak_gb"] >= big["rss_start_gb"] + 0.19 and big["n"] == 200_000_000
    if phases.peak_resets:  # the second phase's peak does not leak into a later one
        with phases("after"):
            pass
        assert phases.records[-1]["peak_gb"] < big["peak_gb"] - 0.1
    prog = read_progress(tmp_path / "p.json")
    assert prog["model"] == "m" and prog["running"] is None and [p["phase"] for p in prog["phases"]][:2] == ["small", "big"]
    assert phase_peaks({"phases": [{"phase": "round0:x", "peak_gb": 1.0}, {"phase": "round1:x", "peak_gb": 2.0}]}) == {"x": 2.0}


def test_run_watched_kills_a_child_over_its_limit_and_names_the_phase(tmp_path):
    prog = tmp_path / "p.json"
    code = ("import sys, time; from benchmarks.memwatch import Phases; ph = Phases(sys.argv[1])\n"
            "with ph('hog'):\n    x = b'\\x01' * 600_000_000; time.sleep(30)\n")
    w = run_watched([sys.executable, "-c", code, str(prog)], limit_gb=0.3, progress=prog, poll_s=0.05, cwd=REPO)
    assert w.killed and w.phase == "hog" and w.rss_gb > 0.3 and w.seconds < 20
    ok = run_watched([sys.executable, "-c", "pass"], limit_gb=5, poll_s=0.05)
    assert ok.returncode == 0 and not ok.killed and ok.phase is None


@pytest.mark.parametrize("model", ["pixart", "sd3"])
def test_dit_models_feeds_match_their_graph(model, tmp_path):
    """--model pixart / sd3: the timing feeds are exactly the inputs of the graph export_one writes, and a tiny
    transformer of the same class goes through the benchmark's export child (build with filled position
    tables, materialise, export, onnxruntime check)."""
    import json

    from benchmarks.sdxl_latency import MODELS, export_one, model_shape, model_spec

    config, text_len, _ = MODELS[model]
    spec, feeds = model_spec(config, 16, text_len), unet_feeds(model_shape(config, 16, text_len), 1)
    assert list(spec.input_names) == list(feeds)
    assert {k: v.shape[1:] for k, v in feeds.items()}["encoder_hidden_states"] == (text_len, 4096)
    tiny = ({"sample_size": 8, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
             "out_channels": 8, "cross_attention_dim": 16, "caption_channels": 12, "patch_size": 2,
             "interpolation_scale": 1} if model == "pixart" else
            {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
             "num_attention_heads": 2, "joint_attention_dim": 12, "caption_projection_dim": 16,
             "pooled_projection_dim": 6, "out_channels": 4, "pos_embed_max_size": 8})
    import torch
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

    from benchmarks.materialize_sd21 import random_unet

    fresh = (PixArtTransformer2DModel if model == "pixart" else SD3Transformer2DModel)(**tiny)
    assert torch.equal(random_unet(tiny).pos_embed.pos_embed, fresh.pos_embed.pos_embed)  # not to_empty's garbage
    space = ArchSpace.from_config(tiny)
    rec = export_one(tiny, "keep_0.60", space.sample(keep=0.6), tmp_path / "e.onnx", 8, 0, 1, tmp_path / "p.json",
                     text_len=5)
    assert rec["ok"] and max(rec["max_rel_error"].values()) <= 1e-5, rec
    assert [p["phase"] for p in rec["phases"]] == ["build", "materialise", "torch_reference", "export",
                                                    "ort_session", "ort_check"]
    assert json.loads((tmp_path / "p.json").read_text())["model"] == "keep_0.60"
