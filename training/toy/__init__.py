"""The built-in toy world (procedural 32x32 captioned images), its scorer and its pretrained teacher.

    from training import toy
    toy.captions(8, seed=0)                  # [(caption, difficulty)], training captions
    toy.captions(64, seed=toy.EVAL_SEED)     # held-out captions (never seen in training)
    toy.samples(8)                           # [Sample(image uint8 [32,32,3], caption, description, difficulty)]
    toy.write_imagefolder("data/toy", 1000, seed=0)
    toy.score(image, description)            # Score(colour: bool, position: bool | None)
    toy.teacher_dir()                        # shipped UNet (diffusers layout) + scheduler + text_encoder.json
"""

from __future__ import annotations

import json
from pathlib import Path

from engines.errors import UserError
from .imagefolder import read_imagefolder, write_imagefolder
from .scorer import Score, score, score_many
from .world import (
    DIFFICULTIES,
    EVAL_SEED,
    PALETTE,
    Sample,
    caption_split,
    captions,
    sample_at,
    samples,
    stream,
)

__all__ = [
    "DIFFICULTIES", "EVAL_SEED", "PALETTE", "Sample", "Score", "caption_split", "captions", "read_imagefolder",
    "load_teacher", "sample_at", "samples", "score", "score_many", "stream", "teacher_dir",
    "write_imagefolder",
]


TEACHERS = {"v1": "teacher", "v2": "teacher_v2"}  # toy world -> the shipped teacher trained on it


def teacher_dir(world: str = "v1") -> Path:
    """Directory of the shipped toy teacher of `world`: unet/, scheduler/, text_encoder.json, sampling.json.
    v1: the default teacher (training/toy/teacher); v2: the world-v2 teacher of issue 20 (3000 warm-started
    steps, train_teacher's docstring has the recipe), `model.path: builtin:toy-teacher-v2` in a config."""
    if world not in TEACHERS:
        raise UserError(f"no shipped toy teacher for world {world!r} (have {', '.join(TEACHERS)})")
    return Path(__file__).resolve().parent / TEACHERS[world]


def load_teacher(device="cpu", scheduler: str = "ddim", path: str | Path | None = None):
    """(unet, scheduler, text_encoder) of the shipped teacher (or of a teacher directory written by
    train_teacher at `path`), ready for `training.sampling.sample`."""
    from diffusers import UNet2DConditionModel  # heavy: the package itself stays torch-free to import

    from training.sampling import make_scheduler
    from training.text import TextEncoder

    d = teacher_dir() if path is None else Path(path)
    for f in ("unet/config.json", "scheduler/scheduler_config.json", "text_encoder.json"):
        if not (d / f).is_file():
            if path is None:
                raise FileNotFoundError(f"the toy teacher is missing from {d}")
            raise UserError(f"--teacher {d}: missing {f}")
    unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet").to(device).eval()
    text_cfg = json.loads((d / "text_encoder.json").read_text())
    text = TextEncoder(max_length=int(text_cfg["max_length"]), device=device)
    return unet, make_scheduler(d / "scheduler", scheduler), text
