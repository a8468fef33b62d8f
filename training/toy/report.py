"""Looking at a toy model: captioned sample grids and the held-out colour / position scores."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .scorer import score
from .world import EVAL_SEED, samples


def make_grid(images: np.ndarray, captions: list[str], scale: int = 4, cols: int | None = None,
              wrap: int = 24):
    """PIL image: each uint8 [H, W, 3] image upscaled `scale`x (nearest) with its caption wrapped under it."""

    images = np.asarray(images)
    n = len(images)
    if n == 0 or n != len(captions):
        raise ValueError("need as many captions as images, at least one")
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    h, w = images.shape[1] * scale, images.shape[2] * scale
    font = ImageFont.load_default()
    line_h = 12
    cell_w = max(w, 6 * wrap + 8)
    lines = [textwrap.wrap(c, wrap) or [""] for c in captions]
    text_h = line_h * max(len(ls) for ls in lines) + 6
    canvas = Image.new("RGB", (cols * cell_w, rows * (h + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (im, ls) in enumerate(zip(images, lines, strict=True)):
        r, c = divmod(i, cols)
        x, y = c * cell_w + (cell_w - w) // 2, r * (h + text_h)
        canvas.paste(Image.fromarray(im).resize((w, h), Image.NEAREST), (x, y))
        for j, line in enumerate(ls):
            draw.text((c * cell_w + 4, y + h + 3 + j * line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def evaluate(unet, text_encoder, scheduler, n: int = 64, steps: int = 25, guidance_scale: float = 7.5,
             seed: int = 0, caption_seed: int = EVAL_SEED, batch_size: int = 16, progress: bool = True,
             world: str = "v1") -> dict:
    """Sample `n` held-out toy captions and score them.

    Returns {"colour": rate, "position": rate | None, "n": n, "n_position": int,
             "by_difficulty": {difficulty: {"colour", "position", "n"}}, "by_template": {...},
             "images": uint8 [n, 32, 32, 3],
             "captions": [...], "scores": [Score]}.
    """

    from training.sampling import sample  # torch

    data = samples(n, caption_seed, world)
    caps = [s.caption for s in data]
    imgs = []
    for s in tqdm(range(0, n, batch_size), desc="eval", disable=not progress):
        imgs.append(sample(unet, caps[s:s + batch_size], text_encoder=text_encoder, scheduler=scheduler,
                           steps=steps, guidance_scale=guidance_scale, seed=seed + s))
    images = np.concatenate(imgs)
    scores = [score(im, d.description) for im, d in zip(images, data, strict=True)]

    def rates(idx):
        pos = [scores[i].position for i in idx if scores[i].position is not None]
        return {"colour": float(np.mean([scores[i].colour for i in idx])) if idx else None,
                "position": float(np.mean(pos)) if pos else None, "n": len(idx), "n_position": len(pos)}

    out = rates(list(range(n)))
    out["by_difficulty"] = {d: rates([i for i, s in enumerate(data) if s.difficulty == d])
                            for d in ("easy", "medium", "hard")}
    templates = sorted({d.description["template"] for d in data})
    out["by_template"] = {t: rates([i for i, s in enumerate(data) if s.description["template"] == t])
                          for t in templates}
    out.update(images=images, captions=caps, scores=scores)
    return out
