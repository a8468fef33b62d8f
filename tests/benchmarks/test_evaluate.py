"""Pieces of the evaluation driver (benchmarks/evaluate.py) with known answers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest

from benchmarks.evaluate import (
    EvalConfig,
    demo_quality,
    demo_quality_markdown,
    load_data,
    prepare_images,
    top_words_by_lift,
)
from engines.errors import UserError
from training.toy import EVAL_SEED, sample_at
from training.toy.clip import make_model, save_clip_dir, toy_vocabulary, word_tokenizer


def test_top_words_are_ranked_by_lift_not_frequency():
    caps = ["a red circle"] * 6 + ["a red square"] * 4 + ["a blue square"] * 10
    ids = [0] * 6 + [1] * 4 + [1] * 10  # expert 0: every "circle", 6 of 10 "red" captions
    top = top_words_by_lift(caps, ids, 0, min_count=5)
    assert [w["word"] for w in top] == ["circle", "red"]
    assert top[0]["lift"] == pytest.approx(1 / 0.3) and top[1]["lift"] == pytest.approx(0.6 / 0.3)
    # expert 1 (share 0.7) has every "square" and every "blue": equal lift 1/0.7, the more frequent first
    assert [w["word"] for w in top_words_by_lift(caps, ids, 1, min_count=5)] == ["square", "blue"]
    assert top_words_by_lift(caps, ids, 2) == []


def test_toy_data_is_the_held_out_stream_paired_by_index():
    d = load_data("toy", 5)
    assert d.captions[3] == sample_at(EVAL_SEED + 11, 3).caption
    assert (d.images[3] == sample_at(EVAL_SEED + 11, 3).image).all() and d.source[3].endswith(":3")


def test_one_resize_rounds_and_keeps_constant_images_exact():
    img = np.full((2, 32, 32, 3), 200, np.uint8)
    out = prepare_images(img, 256)
    assert out.shape == (2, 256, 256, 3) and out.dtype == np.uint8 and (out == 200).all()
    assert prepare_images(img, None) is img


def test_config_rejects_impossible_values(tmp_path):
    with pytest.raises(UserError, match="-n must be >= 2"):
        EvalConfig(engines=str(tmp_path), n=1)
    with pytest.raises(UserError, match="needs --static"):
        EvalConfig(engines=str(tmp_path), models="routed,static")


def test_demo_quality_of_identical_sets(tmp_path):
    vocab = toy_vocabulary()
    d = save_clip_dir(tmp_path / "clip", make_model(len(vocab), width=32, layers=2, projection_dim=16),
                      word_tokenizer(vocab))
    imgs = np.stack([sample_at(EVAL_SEED, i).image for i in range(6)])
    caps = [sample_at(EVAL_SEED, i).caption for i in range(6)]
    q = demo_quality(imgs, imgs, caps, clip=str(d))
    assert q["n"] == 6 and q["clip_score_routed"] == pytest.approx(q["clip_score_dense"])
    assert q["cmmd_routed_vs_dense"] == pytest.approx(0.0, abs=1e-9)
    assert "N = 6" in demo_quality_markdown(q)
    assert demo_quality(imgs, 255 - imgs, caps, clip=str(d))["cmmd_routed_vs_dense"] > 0
