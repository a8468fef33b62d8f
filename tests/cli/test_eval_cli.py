"""`aptp eval` end to end on a tiny random latent (Stable-Diffusion-layout) export with a tiny random CLIP on
disk, offline; and its one-line errors."""

from __future__ import annotations

import json
import math
import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
from engines_export_fixture import build_export
from PIL import Image

from aptp import cli
from training.toy.clip import make_model, save_clip_dir, toy_vocabulary, word_tokenizer


def aptp(argv, monkeypatch):
    """`aptp ARGV` through the real entry point."""
    return cli.main(argv)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    vocab = toy_vocabulary()
    model = make_model(len(vocab), seed=3, width=32, layers=2, projection_dim=16, image_size=16, patch_size=4,
                       max_tokens=16)
    return save_clip_dir(tmp_path_factory.mktemp("clip") / "tiny", model, word_tokenizer(vocab, 16), image_size=16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An imagefolder with 6 real 24x24 images (not the generated size: the shared resize must handle it)."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    caps = ["a red circle on a blue background", "the letter K in green above a small yellow square",
            "a blue background", "two green squares", "a small white cross on the left", "the digit 7 in red"]
    rows = []
    for i, c in enumerate(caps):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
        rows.append(json.dumps({"file_name": f"{i:03d}.png", "text": c}))
    (d / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return d


def test_eval_runs_offline_on_a_tiny_latent_export(tmp_path, clip_dir, data_dir, monkeypatch):
    export = build_export("latent")

    def no_network(*a, **k):
        raise AssertionError("aptp eval touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    out = tmp_path / "eval"
    code = aptp(["eval", "--engines", str(export.dir), "--data", str(data_dir), "-n", "6", "--models",
                 "routed,expert-1", "--clip", str(clip_dir), "--out", str(out), "--steps", "2", "--resize", "32"],
                monkeypatch)
    assert code == 0
    res = json.loads((out / "eval.json").read_text())
    assert [r["model"] for r in res["models"]] == ["routed", "expert-1"]
    for r in res["models"]:
        assert r["n"] == 6 and r["small_n"]
        assert 0 <= r["clip_score"] <= 100
        assert math.isfinite(r["cmmd"]) and r["cmmd"] >= -1e-9
        assert math.isfinite(r["fd_clip"]) and r["fd_clip"] >= -1e-9
        assert 0 < r["macs_fraction"] <= 1 and r["seconds_per_image"] > 0
    # explicit index pairing, seeds recorded per caption, routing recorded per model
    assert [p["index"] for p in res["pairs"]] == list(range(6))
    assert [p["seed"] for p in res["pairs"]] == list(range(6))
    assert [p["source"] for p in res["pairs"]] == [f"{i:03d}.png" for i in range(6)]
    assert all(p["expert-1"] == 1 for p in res["pairs"])
    assert sum(e["share"] for e in res["experts"]) == pytest.approx(1.0)
    assert 0 <= res["real"]["clip_score"] <= 100
    assert (out / "quality_vs_macs.png").stat().st_size > 0 and "| routed | 6 |" in (out / "eval.md").read_text()
    # a second run reuses the cached images and gives the same figures
    assert aptp(["eval", "--engines", str(export.dir), "--data", str(data_dir), "-n", "6", "--models",
                 "routed,expert-1", "--clip", str(clip_dir), "--out", str(out), "--steps", "2", "--resize", "32"],
                monkeypatch) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["models"][0]["clip_score"] == res["models"][0]["clip_score"]


@pytest.mark.parametrize("extra, message", [
    (["--inception", "/nonexistent/pt_inception.pth"], "--inception /nonexistent/pt_inception.pth: no such file"),
    (["--models", "routed,bogus"], "unknown model 'bogus'"),
    (["--clip", "/nonexistent/clip"], "--clip /nonexistent/clip: not a CLIP model directory"),
    (["--data", "/nonexistent/data"], "--data /nonexistent/data: not 'toy', 'toy-v2' nor an imagefolder"),
])
def test_eval_bad_input_is_a_one_line_error(extra, message, capsys, monkeypatch, tmp_path):
    code = aptp(["eval", "--engines", str(tmp_path), "--out", str(tmp_path / "o"), *extra], monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("aptp eval: error:")
    assert not (tmp_path / "o").exists()
