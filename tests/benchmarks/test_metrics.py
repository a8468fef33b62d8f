"""Known answers of the quality metrics (benchmarks/metrics.py): Fréchet distance, CMMD, CLIP score."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from benchmarks.metrics import (
    ClipEmbedder,
    check_inception_weights,
    clip_score,
    cmmd,
    frechet_distance,
    inception_fid,
)
from engines.errors import UserError
from training.toy.clip import make_model, save_clip_dir, toy_vocabulary, word_tokenizer


def _with_moments(rng, n: int, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """n samples whose sample mean is exactly `mean` and N-1 sample covariance exactly diag(var)."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    c = np.cov(z, rowvar=False, ddof=1)
    z = z @ np.linalg.inv(np.linalg.cholesky(c)).T  # whitened: sample covariance = I
    return z * np.sqrt(var) + mean


def test_frechet_of_diagonal_gaussians_has_the_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    var_a, var_b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    a, b = _with_moments(rng, 500, mu_a, var_a), _with_moments(rng, 700, mu_b, var_b)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)


def test_frechet_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(1).normal(size=(300, 64)) @ np.random.default_rng(2).normal(size=(64, 64))
    assert abs(frechet_distance(x, x)) < 1e-8 * np.trace(np.cov(x, rowvar=False))


def test_frechet_rejects_mismatched_or_tiny_inputs():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cmmd_symmetric_zero_for_identical_sets_and_blockwise_equals_full():
    rng = np.random.default_rng(3)
    a, b = _unit(rng, 70, 32), _unit(rng, 45, 32) + 0.3
    assert cmmd(a, a) == pytest.approx(0.0, abs=1e-9)
    assert cmmd(a, b) == pytest.approx(cmmd(b, a), rel=1e-12)
    full = cmmd(a, b, block=10_000)
    for block in (1, 7, 64):
        assert cmmd(a, b, block=block) == pytest.approx(full, rel=1e-12)
    # the biased estimator against a direct float64 computation with the whole kernel matrices
    k = lambda x, y: np.exp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) / 200.0)  # noqa: E731
    assert full == pytest.approx(1000 * (k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()), rel=1e-10)
    assert full > 0


def test_cmmd_of_one_pair_each():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(1, 8)), rng.normal(size=(1, 8)) * 3
    d2 = float(((a - b) ** 2).sum())
    assert cmmd(a, b) == pytest.approx(1000 * (2 - 2 * np.exp(-d2 / 200)), rel=1e-12)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel with a word-level tokenizer and a preprocessor, saved like a real CLIP dir."""
    vocab = toy_vocabulary()
    model = make_model(len(vocab), seed=5, width=32, layers=2, projection_dim=16, image_size=16, patch_size=4,
                       max_tokens=12)
    return save_clip_dir(tmp_path_factory.mktemp("clip") / "tiny", model, word_tokenizer(vocab, 12), image_size=16)


def test_clip_score_is_100_cos_by_hand(tiny_clip_dir):
    from PIL import Image
    from transformers import AutoTokenizer, CLIPModel

    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    captions = ["a red circle", "the letter k in blue", "two green squares", "a black background", "a small cross"]
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip_dir)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pv = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pv).pooler_output)
        t = tok(captions, padding=True, return_tensors="pt")
        txt = model.text_projection(model.text_model(**t).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double()).numpy()
    expected = float(np.mean(100 * np.maximum(cos, 0)))
    assert clip_score(images, captions, tiny_clip_dir) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # PIL images go through the same path
    pil = [Image.fromarray(im) for im in images]
    assert clip_score(pil, captions, tiny_clip_dir) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # per pair, not the mean, is clamped: the mean of clamped pairs >= clamp of the mean
    assert expected >= max(0.0, 100 * cos.mean()) - 1e-9


def test_over_long_caption_scores_as_its_truncation_keeping_the_end_token(tiny_clip_dir):
    clip = ClipEmbedder(tiny_clip_dir)
    long = "a red circle above a small green square on the left " * 3
    ids = clip.tokenizer(long)["input_ids"]
    assert len(ids) > clip.max_tokens
    truncated = ids[:clip.max_tokens - 1] + [clip.tokenizer.eos_token_id]  # <bos> words… <eos>
    got = clip.tokenize([long])["input_ids"][0].tolist()
    assert got == truncated
    with torch.no_grad():
        by_hand = clip.model.text_projection(clip.model.text_model(input_ids=torch.tensor([truncated])).pooler_output)
    by_hand = torch.nn.functional.normalize(by_hand, dim=-1).double().numpy()
    np.testing.assert_allclose(clip.text_embeddings([long]), by_hand, rtol=1e-5, atol=1e-6)
    image = np.random.default_rng(7).integers(0, 256, size=(1, 16, 16, 3), dtype=np.uint8)
    expected = 100 * max(float(clip.image_embeddings(image)[0] @ by_hand[0]), 0.0)
    assert clip_score(image, [long], clip) == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_clip_dir_missing_files_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a CLIP model directory"):
        ClipEmbedder(tmp_path)


def test_inception_weights_missing_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        check_inception_weights(tmp_path / "pt_inception.pth")


def test_fid_through_torchmetrics(tmp_path):
    pytest.importorskip("torchmetrics", reason="FID needs the eval extra (torchmetrics)")
    pytest.importorskip("torch_fidelity", reason="torchmetrics' FID needs torch-fidelity, which needs a torchvision "
                                                 "that imports with this torch (none does with CPU torch 2.13)")
    weights = os.environ.get("APTP_INCEPTION_WEIGHTS")
    if not weights:
        pytest.skip("set APTP_INCEPTION_WEIGHTS to the FID Inception weights file to run FID")
    rng = np.random.default_rng(8)
    real = rng.integers(0, 256, size=(64, 64, 64, 3), dtype=np.uint8)
    assert inception_fid(real, real, weights) == pytest.approx(0.0, abs=1e-3)
    assert inception_fid(real, 255 - real, weights) > 1.0
