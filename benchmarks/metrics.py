"""Image-quality metrics of text-to-image models, computed from weights on disk (nothing is downloaded).

    frechet_distance(feats_a, feats_b)           # [N, D] features -> Fréchet distance of their Gaussians
    cmmd(emb_a, emb_b)                           # [N, D] L2-normalised CLIP embeddings -> CMMD (x 1000)
    clip_score(images, captions, model_dir)      # mean over pairs of 100 * max(cos(image, text), 0)
    clip = ClipEmbedder(model_dir)               # CLIPModel + tokenizer + image preprocessing of one directory
    clip.image_embeddings(images); clip.text_embeddings(captions)
    inception_fid(real, fake, weights_path)      # FID with the FID InceptionV3 (the `eval` extra)

The definitions follow the papers and their reference code, and differ from common library code where
that code is wrong:
- Fréchet distance: float64 statistics, N-1 covariance, tr sqrt(Σa Σb) from the eigenvalues of the
  symmetric matrix sqrt(Σa) Σb sqrt(Σa) (no scipy, no complex round-off to discard).
- CMMD (Jayasumana et al. 2024, google-research/cmmd): Gaussian RBF kernel with σ = 10,
  k(a, b) = exp(-|a-b|² / 200), scaled by 1000, the biased estimator (diagonal terms included), which
  is what published numbers use. Computed in float64 row blocks so 30k x 30k never sits in memory.
  At small N the bias is large: report N beside every CMMD.
- CLIP score (Hessel et al. 2021 with w = 100, as in the APTP paper): 100 * max(cos, 0) per pair, then
  the mean (torchmetrics clamps the mean instead); captions longer than the text tower's context are
  truncated by the tokenizer, which keeps the end token that CLIP pools at.
Images are uint8 [N, H, W, 3] arrays or PIL images; resize them (one antialiased resize shared by
real and generated images) before calling, see `benchmarks.evaluate.prepare_images`.
"""

from __future__ import annotations

from engines.install import install_hint
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPModel

try:  # transformers >= 5: the PIL backend by name (the default class wants torchvision)
    from transformers import CLIPImageProcessorPil as _ClipImageProcessor
except ImportError:  # transformers 4: CLIPImageProcessor is the PIL/numpy one
    from transformers import CLIPImageProcessor as _ClipImageProcessor

from engines.errors import UserError

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
CLIP_SCORE_WEIGHT = 100.0
CLIP_MAX_TOKENS = 77


# -- Fréchet distance ----------------------------------------------------------------------------------
def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (N-1 normalisation) of features [N, D], in float64."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("features contain non-finite values")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_frechet(mu_a, cov_a, mu_b, cov_b) -> float:
    """|mu_a - mu_b|² + tr(Σa + Σb - 2 (Σa Σb)^½) of two Gaussians (float64).

    tr (Σa Σb)^½ = Σ sqrt(eig(Σa^½ Σb Σa^½)): that matrix is symmetric PSD and similar to Σa Σb, so its
    eigenvalues are real and non-negative (up to round-off, clipped)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    s = _sqrt_psd(cov_a)
    m = s @ cov_b @ s
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between the Gaussians fitted to features [N, D] and [M, D] (float64, N-1 cov).

    With Inception pool features this is FID; with CLIP image embeddings it is FD-CLIP (never call
    that FID). Below ~2048 samples the estimate is biased upward: compare only figures at equal N."""
    mu_a, cov_a = feature_statistics(feats_a)
    mu_b, cov_b = feature_statistics(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return gaussian_frechet(mu_a, cov_a, mu_b, cov_b)


# -- CMMD ----------------------------------------------------------------------------------------------
def _kernel_mean(x: np.ndarray, y: np.ndarray, block: int) -> float:
    """Mean of exp(-|x_i - y_j|² / (2σ²)) over all i, j, in row blocks of x."""
    gamma = 1.0 / (2.0 * CMMD_SIGMA ** 2)
    y_sq = np.einsum("ij,ij->i", y, y)
    total = 0.0
    for i in range(0, len(x), block):
        xb = x[i:i + block]
        d2 = np.einsum("ij,ij->i", xb, xb)[:, None] + y_sq[None, :] - 2.0 * (xb @ y.T)
        total += float(np.exp(-gamma * np.maximum(d2, 0.0)).sum())
    return total / (len(x) * len(y))


def cmmd(emb_a, emb_b, block: int = 1024) -> float:
    """CMMD between embedding sets [N, D] and [M, D] (google-research/cmmd's biased estimator):

        1000 * (mean k(a, a') + mean k(b, b') - 2 mean k(a, b)),  k(u, v) = exp(-|u - v|² / 200)

    Embeddings should be L2-normalised CLIP image embeddings (`ClipEmbedder.image_embeddings`). float64,
    `block` rows at a time (memory block x max(N, M) doubles)."""
    a, b = np.asarray(emb_a, np.float64), np.asarray(emb_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"embeddings must be [N, D] and [M, D], got {list(a.shape)} and {list(b.shape)}")
    if block < 1:
        raise ValueError("block must be >= 1")
    return CMMD_SCALE * (_kernel_mean(a, a, block) + _kernel_mean(b, b, block) - 2.0 * _kernel_mean(a, b, block))


# -- CLIP ----------------------------------------------------------------------------------------------
def _as_pil(images) -> list[Image.Image]:
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
        return [Image.fromarray(im, "RGB") for im in images]
    return [im.convert("RGB") for im in images]


class ClipEmbedder:
    """A CLIP model, its tokenizer and its image preprocessing, all read from one local directory.

    The directory holds what `CLIPModel.save_pretrained` and a tokenizer's `save_pretrained` write, plus
    preprocessor_config.json (e.g. a copy of openai/clip-vit-base-patch32, or the toy CLIP shipped in
    training/toy/clip). Embeddings are the projected, L2-normalised image / text features, float64."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", batch_size: int = 64):
        d = Path(model_dir)
        missing = [f for f in ("config.json", "preprocessor_config.json") if not (d / f).is_file()]
        if missing:
            raise UserError(f"{d}: not a CLIP model directory (missing {', '.join(missing)})")
        self.dir = d
        self.device = device
        self.batch_size = int(batch_size)
        self.model = CLIPModel.from_pretrained(d).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(d)
        self.processor = _ClipImageProcessor.from_pretrained(d)
        self.max_tokens = min(CLIP_MAX_TOKENS, int(self.model.config.text_config.max_position_embeddings))
        self.name = json.loads((d / "config.json").read_text()).get("_name_or_path") or d.name

    @torch.no_grad()
    def image_embeddings(self, images) -> np.ndarray:
        """L2-normalised image embeddings [N, E] float64 of uint8 [N, H, W, 3] images or PIL images."""
        pil = _as_pil(images)
        out = []
        for i in range(0, len(pil), self.batch_size):
            pv = self.processor(images=pil[i:i + self.batch_size], return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pv.to(self.device)).pooler_output
            out.append(torch.nn.functional.normalize(self.model.visual_projection(pooled), dim=-1).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.projection_dim))

    def tokenize(self, captions: Sequence[str]) -> dict:
        """input_ids / attention_mask [B, S], truncated to the text tower's context keeping the end token."""
        return self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_tokens,
                              return_tensors="pt")

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings [N, E] float64 of captions (over-long ones truncated)."""
        out = []
        for i in range(0, len(captions), self.batch_size):
            tok = self.tokenize(captions[i:i + self.batch_size])
            pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device)).pooler_output
            out.append(torch.nn.functional.normalize(self.model.text_projection(pooled), dim=-1).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.projection_dim))


def clip_score_from_embeddings(image_emb, text_emb) -> float:
    """Mean over pairs of 100 * max(cos, 0) for paired L2-normalised embeddings [N, E]."""
    a, b = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    if a.shape != b.shape or a.ndim != 2 or not len(a):
        raise ValueError(f"paired embeddings must have one shape [N, E], got {list(a.shape)} and {list(b.shape)}")
    return float(np.mean(CLIP_SCORE_WEIGHT * np.maximum(np.einsum("ij,ij->i", a, b), 0.0)))


def clip_score(images, captions: Sequence[str], model_dir, device: str = "cpu") -> float:
    """CLIP score of images [N] against their captions [N] (pair i = image i, caption i) with the CLIP
    model in `model_dir`: mean of 100 * max(cos(image, text), 0)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    clip = model_dir if isinstance(model_dir, ClipEmbedder) else ClipEmbedder(model_dir, device=device)
    return clip_score_from_embeddings(clip.image_embeddings(images), clip.text_embeddings(captions))


# -- Inception (FID) ------------------------------------------------------------------------------------
def check_inception_weights(path) -> Path:
    """The FID Inception weights file, or a UserError naming the problem (before any generation)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--inception {p}: no such file (give the FID InceptionV3 weights, "
                        "e.g. torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    return p


def _fid_metric(weights_path):
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' FID feature extractor)
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise UserError(f"FID needs the eval extra: {install_hint('eval')} (torchmetrics, torch-fidelity, "
                        f"which needs a torchvision matching your torch) ({e})") from None
    return FrechetInceptionDistance(feature=2048, normalize=False,
                                    feature_extractor_weights_path=str(check_inception_weights(weights_path)))


def inception_fid(real_images, fake_images, weights_path, batch_size: int = 64) -> float:
    """FID of uint8 [N, H, W, 3] image sets with the FID InceptionV3 from a local weights file, through
    torchmetrics (float64 statistics, N-1 covariance). Resize both sets the same way before calling."""
    metric = _fid_metric(weights_path)
    for imgs, real in ((real_images, True), (fake_images, False)):
        arr = np.stack([np.asarray(im.convert("RGB")) for im in _as_pil(imgs)])
        for i in range(0, len(arr), batch_size):
            metric.update(torch.from_numpy(arr[i:i + batch_size]).permute(0, 3, 1, 2).contiguous(), real=real)
    return float(metric.compute())
