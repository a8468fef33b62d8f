"""Write (and read back) the toy world in the Hugging Face `imagefolder` layout.

    DIR/00000000.png ...           # RGB PNG files
    DIR/metadata.jsonl             # {"file_name", "text", "difficulty", "description"} per line

`datasets.load_dataset("imagefolder", data_dir=DIR)` reads it; `read_imagefolder` reads it without `datasets`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from engines.fileio import atomic_path, write_text

from .world import sample_at


def write_imagefolder(out_dir: str | os.PathLike, n: int, seed: int = 0, progress: bool = True) -> Path:
    """Write the first `n` samples of `seed` as PNG files + metadata.jsonl into `out_dir`. Returns the dir.

    Every file is written atomically; metadata.jsonl is written last, so a directory with a metadata file
    is complete.
    """
    if n <= 0:
        raise ValueError("n must be > 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in tqdm(range(n), desc="toy data", disable=not progress):
        s = sample_at(seed, i)
        name = f"{i:08d}.png"
        with atomic_path(out / name) as tmp:
            Image.fromarray(s.image, "RGB").save(tmp, format="PNG")
        lines.append(json.dumps({"file_name": name, "text": s.caption, "difficulty": s.difficulty,
                                 "description": s.description}))
    write_text(out / "metadata.jsonl", "\n".join(lines) + "\n")
    return out


def read_imagefolder(data_dir: str | os.PathLike) -> Iterator[tuple[np.ndarray, str, dict]]:
    """Yield (uint8 [H, W, 3] image, text, full metadata row) from an imagefolder directory."""
    root = Path(data_dir)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found (not an imagefolder dataset)")
    with open(meta) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            with Image.open(root / row["file_name"]) as im:
                yield np.asarray(im.convert("RGB")), row["text"], row
