"""The toy world: determinism, spread of difficulty, hold-out split, imagefolder round trip, caption length,
and the scorer (ground truth scores ~100 %, corrupted images fail)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from training import toy
from training.toy.font import DIGITS, LETTERS, glyph
from training.toy.scorer import classify
from training.toy.world import OBJECT_COLOURS, PALETTE, POSITIONS


def test_deterministic_per_seed_and_index():
    a, b = toy.samples(25, seed=7), toy.samples(25, seed=7)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image)
        assert (x.caption, x.description, x.difficulty) == (y.caption, y.description, y.difficulty)
    assert np.array_equal(toy.sample_at(7, 13).image, a[13].image)  # random access = stream
    s = toy.stream(7, start=20)
    assert next(s).caption == a[20].caption
    c = toy.samples(25, seed=8)
    assert sum(x.caption != y.caption for x, y in zip(a, c, strict=True)) > 15


def test_sample_format():
    for s in toy.samples(50, seed=1):
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
        assert s.difficulty in toy.DIFFICULTIES and s.description["difficulty"] == s.difficulty
        json.dumps(s.description)  # serialisable
        for o in s.description["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            assert o["colour"] in OBJECT_COLOURS and o["colour"] != s.description["background"]
            assert o["position"] in (None, *POSITIONS)
            # the object's colour really is drawn inside its box
            box = s.image[y0:y1, x0:x1].reshape(-1, 3)
            assert (box == np.array(PALETTE[o["colour"]], np.uint8)).all(-1).sum() >= 4
            assert o["colour"] in s.caption


def test_difficulty_spread_and_content():
    caps = toy.captions(600, seed=0)
    frac = {d: sum(x == d for _, x in caps) / len(caps) for d in toy.DIFFICULTIES}
    assert all(0.2 <= f <= 0.5 for f in frac.values()), frac
    text = [c for c, _ in caps]
    assert any(c.startswith("the letter") and " above a small " in c for c in text)
    assert any(c.startswith("the digit") for c in text)
    assert any(c.endswith(" background") and len(c.split()) == 3 for c in text)
    assert any(c.split()[0] in ("two", "three") for c in text)
    assert any(" left of " in c for c in text)
    assert len(set(text)) > 300


def test_hold_out_split():
    train = {c for c, _ in toy.captions(400, seed=0)}
    held = {c for c, _ in toy.captions(100, seed=toy.EVAL_SEED)}
    assert all(toy.caption_split(c) == "train" for c in train)
    assert all(toy.caption_split(c) == "eval" for c in held)
    assert not train & held
    # the held-out set still spans every difficulty
    assert {d for _, d in toy.captions(100, seed=toy.EVAL_SEED)} == set(toy.DIFFICULTIES)


def test_font_glyphs_distinct():
    masks = {ch: glyph(ch) for ch in LETTERS + DIGITS}
    assert len(masks) == 36 and all(m.shape == (7, 5) and m.any() for m in masks.values())
    keys = {m.tobytes() for m in masks.values()}
    assert len(keys) == 36


def test_imagefolder_round_trip(tmp_path):
    out = toy.write_imagefolder(tmp_path / "ds", 12, seed=3, progress=False)
    rows = list(toy.read_imagefolder(out))
    ref = toy.samples(12, seed=3)
    assert len(rows) == 12
    for (img, text, row), s in zip(rows, ref, strict=True):
        assert np.array_equal(img, s.image) and text == s.caption
        assert row["difficulty"] == s.difficulty and row["description"] == s.description
        assert set(row) >= {"file_name", "text"}
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    with pytest.raises(ValueError):
        toy.write_imagefolder(tmp_path / "x", 0)


def test_captions_fit_16_minilm_tokens():
    from tokenizers import Tokenizer

    from training.text import default_model_dir

    tok = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    caps = [c for c, _ in toy.captions(1500, seed=0) + toy.captions(300, seed=toy.EVAL_SEED)]
    lengths = [len(e.ids) for e in tok.encode_batch(caps)]  # includes [CLS] and [SEP]
    assert max(lengths) <= 16, max(lengths)


def test_scorer_ground_truth_scores_full():
    data = toy.samples(300, seed=11)
    res = toy.score_many([s.image for s in data], [s.description for s in data])
    assert res["colour"] == 1.0 and res["position"] == 1.0 and res["n_position"] > 150


def _recolour(s, rng):
    main = s.description["objects"][0]
    img = s.image.copy()
    old = np.array(PALETTE[main["colour"]], np.uint8)
    others = {o["colour"] for o in s.description["objects"]} | {s.description["background"]}
    new = rng.choice([c for c in OBJECT_COLOURS if c not in others])
    x0, y0, x1, y1 = main["bbox"]
    region = img[y0:y1, x0:x1]
    region[(region == old).all(-1)] = PALETTE[new]
    return img


def test_scorer_rejects_recoloured_and_moved_and_empty():
    rng = np.random.default_rng(0)
    data = [s for s in toy.samples(200, seed=12) if s.description["objects"]]
    for s in data:
        assert not toy.score(_recolour(s, rng), s.description).colour, s.caption
        blank = np.empty_like(s.image)
        blank[:] = PALETTE[s.description["background"]]
        assert not toy.score(blank, s.description).colour
    # mirror images whose caption constrains a horizontal position -> position must fail
    moved = [s for s in data if s.description["relation"] is None
             and s.description["objects"][0]["position"] in ("left", "right")]
    rel = [s for s in data if (s.description["relation"] or {}).get("type") == "left of"]
    assert moved and rel
    for s in moved + rel:
        assert toy.score(s.image[:, ::-1], s.description).position is False, s.caption
    vert = [s for s in data if (s.description["relation"] or {}).get("type") == "above"
            or s.description["objects"][0]["position"] in ("top", "bottom")]
    for s in vert:
        assert toy.score(s.image[::-1], s.description).position is False, s.caption


def test_scorer_background_and_noise_tolerance():
    rng = np.random.default_rng(1)
    data = toy.samples(100, seed=13)
    bgs = [s for s in data if not s.description["objects"]]
    assert bgs
    for s in bgs:
        assert toy.score(s.image, s.description).colour
        other = [c for c in PALETTE if c != s.description["background"]][0]
        assert not toy.score(np.full_like(s.image, PALETTE[other]), s.description).colour
    # mild pixel noise (as in generated images) does not change the verdict
    for s in data:
        noisy = np.clip(s.image.astype(int) + rng.integers(-20, 21, s.image.shape), 0, 255).astype(np.uint8)
        sc = toy.score(noisy, s.description)
        assert sc.colour and sc.position in (True, None), s.caption
    assert classify(np.array([[PALETTE["orange"]]], np.uint8))[0, 0] == list(PALETTE).index("orange")


# ------------------------------------------------------------------------------------------ world v2

def test_v1_is_the_default_and_v2_differs():
    a = toy.samples(40, seed=5)
    assert [s.caption for s in a] == [s.caption for s in toy.samples(40, seed=5, world="v1")]
    b = toy.samples(40, seed=5, world="v2")
    assert sum(x.caption != y.caption for x, y in zip(a, b, strict=True)) > 20
    with pytest.raises(ValueError, match="unknown toy world"):
        toy.sample_at(0, 0, world="v3")


def test_v2_grids_and_text_are_drawn_as_captioned():
    data = toy.samples(400, seed=21, world="v2")
    grids = [s for s in data if s.description["template"] in ("grid2", "grid3")]
    texts = [s for s in data if s.description["template"] == "text3"]
    assert len(grids) > 40 and len(texts) > 30
    for s in grids:
        cells = s.description["cells"]
        n = len(cells)
        assert s.caption.split(": ")[1].split() == [c for row in cells for c in row]
        step = 32 // n
        for r in range(n):
            for c in range(n):  # the centre pixel of each cell has the cell's colour
                y, x = r * step + step // 2, c * step + step // 2
                assert tuple(s.image[y, x]) == PALETTE[cells[r][c]], (s.caption, r, c)
    for s in texts:
        chars = [o["char"] for o in s.description["objects"]]
        assert s.caption.startswith("the text " + " ".join(chars) + " in ")
        assert [o["bbox"][0] for o in s.description["objects"]] == sorted(o["bbox"][0] for o in s.description["objects"])


def test_v2_held_out_has_flat_fields_and_every_difficulty_and_fits_16_tokens():
    from tokenizers import Tokenizer

    from training.text import default_model_dir

    held = toy.samples(400, seed=toy.EVAL_SEED, world="v2")
    assert {s.difficulty for s in held} == set(toy.DIFFICULTIES)
    flat = {s.caption for s in held if s.description["template"] == "background"}
    assert len(flat) >= 3, flat  # v1's nine background captions all hash to "train"
    assert all(toy.caption_split(s.caption) == "eval" for s in held)
    tok = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    caps = [s.caption for s in held + toy.samples(1000, seed=0, world="v2")]
    assert max(len(e.ids) for e in tok.encode_batch(caps)) <= 16


def test_v2_scorer_ground_truth_full_and_swapped_cell_fails():
    data = toy.samples(300, seed=22, world="v2")
    res = toy.score_many([s.image for s in data], [s.description for s in data])
    assert res["colour"] == 1.0 and res["position"] == 1.0
    grids = [s for s in data if s.description.get("cells")]
    rng = np.random.default_rng(0)
    for s in grids:
        cells = [row[:] for row in s.description["cells"]]
        n = len(cells)
        r, c = int(rng.integers(n)), int(rng.integers(n))
        cells[r][c] = next(x for x in PALETTE if x != cells[r][c])
        assert not toy.score(s.image, {**s.description, "cells": cells}).colour, s.caption
