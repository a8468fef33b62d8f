"""The shipped toy CLIP (training/toy/clip/): loads offline through the same code path as a real CLIP
directory, covers the toy vocabulary, and retrieves held-out images far above chance."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json

import numpy as np
import pytest

from benchmarks.metrics import ClipEmbedder, clip_score
from training.toy import EVAL_SEED, samples
from training.toy.clip import ClipRecipe, clip_dir, retrieval_accuracy, toy_vocabulary, train, word_tokenizer


@pytest.fixture(scope="module")
def toy_clip():
    return ClipEmbedder(clip_dir())


def test_shipped_toy_clip_is_small_and_records_its_recipe():
    files = {f.name: f.stat().st_size for f in clip_dir().iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "train.json"} <= set(files)
    assert sum(files.values()) < 10 * 2 ** 20
    info = json.loads((clip_dir() / "train.json").read_text())
    assert info["heldout_retrieval"]["top1"] > 0.3


def test_toy_clip_retrieves_held_out_images_far_above_chance(toy_clip):
    # 256 held-out captions (never seen in training), each among 32 candidate images; chance is 1/32
    acc = retrieval_accuracy(toy_clip.model, toy_clip.tokenizer, n=256, candidates=32)
    assert acc["top1"] > 0.3 > 8 * acc["chance"]


def test_shipped_v2_toy_clip_retrieves_world_v2_held_out_images_and_scores_grids():
    """training/toy/clip_v2 (world v2): held-out retrieval far above chance, and on 3x3 grids, whose caption
    names every cell, the true caption beats the same grid's colours shuffled among the cells (only just)."""
    from training.toy.world import samples as world_samples

    emb = ClipEmbedder(clip_dir("v2"))
    assert json.loads((clip_dir("v2") / "train.json").read_text())["recipe"]["world"] == "v2"
    acc = retrieval_accuracy(emb.model, emb.tokenizer, n=256, candidates=32, world="v2")
    assert acc["top1"] > 0.5 > 15 * acc["chance"]
    grids = [s for s in world_samples(600, EVAL_SEED + 5, world="v2") if s.description["template"] == "grid3"][:40]
    rng = np.random.default_rng(0)
    shuffled = []
    for s in grids:
        head, colours = s.caption.split(": ")
        shuffled.append(head + ": " + " ".join(rng.permutation(colours.split())))
    images = np.stack([s.image for s in grids])
    # measured 93.1 vs 91.7: like a real CLIP, the toy one is weak on word order (which cell has which colour)
    assert clip_score(images, [s.caption for s in grids], emb) > clip_score(images, shuffled, emb) + 0.5


def test_every_toy_caption_word_is_in_the_vocabulary():
    tok = word_tokenizer(toy_vocabulary())
    caps = [s.caption for s in samples(500, EVAL_SEED)] + [s.caption for s in samples(500, 0)]
    assert all(tok.unk_token_id not in ids for ids in tok(caps)["input_ids"])


def test_matching_captions_score_higher_than_shuffled_ones(toy_clip):
    data = samples(64, EVAL_SEED + 3)
    images = np.stack([s.image for s in data])
    caps = [s.caption for s in data]
    assert clip_score(images, caps, toy_clip) > clip_score(images, caps[1:] + caps[:1], toy_clip) + 5


def test_recipe_runs_and_writes_a_loadable_directory(tmp_path):
    from training.toy.clip import save_clip_dir

    model, tok, info = train(ClipRecipe(steps=2, batch=8, pool=32, width=32, layers=2), progress=False, eval_n=64)
    assert info["recipe"]["steps"] == 2 and 0 <= info["heldout_retrieval"]["top1"] <= 1
    d = save_clip_dir(tmp_path / "clip", model, tok, info=info)
    emb = ClipEmbedder(d).image_embeddings(np.zeros((2, 32, 32, 3), np.uint8))
    assert emb.shape == (2, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1)


def test_v2_vocabulary_covers_world_v2_and_leaves_v1_as_shipped():
    """Every word of 3,000 world-v2 captions is in the v2 vocabulary (no <unk>); v1's vocabulary (the one the
    shipped training/toy/clip was trained with) is unchanged and has none of v2's words."""
    from training.toy.clip import V2_WORDS, toy_vocabulary, word_tokenizer
    from training.toy.world import captions

    tok = word_tokenizer(toy_vocabulary("v2"))
    unk = tok.convert_tokens_to_ids("<unk>")
    for caption, _ in captions(3000, seed=5, world="v2"):
        assert unk not in tok(caption)["input_ids"], caption
    v1 = toy_vocabulary("v1")
    assert not set(V2_WORDS) & set(v1)
    shipped = json.loads((clip_dir() / "tokenizer.json").read_text())["model"]["vocab"]
    assert sorted(shipped, key=shipped.get) == v1
