"""Image-caption datasets and deterministic global batches.

Datasets (all map-style, index -> (pixels float32 [3, S, S] in [-1, 1], caption)):
- `ToyDataset`: the first `n` samples of the built-in toy world for a seed (also carries difficulty);
- `ImageFolderDataset`: a directory in the Hugging Face imagefolder layout (metadata.jsonl with
  `file_name` and a text column). A broken JSON line is an error naming the line; a missing or
  undecodable image is skipped and counted (one warning with the count); nothing left is an error;
- `HFDataset`: any `datasets` dataset with an image and a text column (a hub name, readable offline
  from the local cache, or a directory written by `save_to_disk`). Needs the `data` extra.
Images are resized (shorter side to S, bicubic) and centre-cropped to S x S. `collate(..., sizes=True)` also
gives each image's original (height, width) and the crop's (top, left) in the resized image: SDXL's size
conditioning (time_ids), as diffusers' SDXL training script records it.

`GlobalBatches` yields, for every step, the global batch's dataset indices (a fresh permutation per
epoch, a pure function of seed and epoch, so resuming needs no data-loader state); each process takes
its contiguous slice.
"""

from __future__ import annotations

from engines.install import install_hint
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engines.errors import UserError

from . import toy

log = logging.getLogger("aptp.data")


def resized(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to `size` (to_tensor's rule)."""
    s = size / min(w, h)
    return max(size, round(h * s)), max(size, round(w * s))


def flip_sizes(sizes: torch.Tensor, size: int) -> torch.Tensor:
    """sizes [B, 4] (h, w, top, left) of images flipped left-right after cropping: the crop's left edge
    measured from the other side (the crop's offset in the mirrored image; diffusers' SDXL training script
    records `resolution - left` instead, which is not an offset of the flipped crop)."""
    out = sizes.clone()
    for row in out:
        h, w, _, left = (int(v) for v in row)
        row[3] = resized(h, w, size)[1] - size - left
    return out


def to_tensor(image, size: int, with_size: bool = False):
    """PIL image or uint8 array [H, W, 3] -> float32 [3, size, size] in [-1, 1] (resize shorter side, centre
    crop); with `with_size` also (original height, width, crop top, crop left)."""

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    geometry = (h, w, 0, 0)
    if (w, h) != (size, size):
        nh, nw = resized(h, w, size)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
        geometry = (h, w, top, left)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    return (t, geometry) if with_size else t


class ToyDataset:
    """The first `n` toy-world samples of `seed` (seed >= toy.EVAL_SEED = held-out captions)."""

    def __init__(self, n: int, seed: int = 0, size: int = 32, world: str = "v1"):
        samples = toy.samples(int(n), seed=int(seed), world=world)
        self.world = world
        self.size = int(size)
        self.images = np.stack([s.image for s in samples])      # uint8 [n, 32, 32, 3]
        self.captions = [s.caption for s in samples]
        self.difficulty = [s.difficulty for s in samples]
        self.descriptions = [s.description for s in samples]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        return self.get(i)[:2]

    def get(self, i: int):
        """(pixels, caption, (original h, w, crop top, left))."""
        img = self.images[i]
        if self.size == img.shape[0] == img.shape[1]:
            t = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
            return t, self.captions[i], (self.size, self.size, 0, 0)
        t, geometry = to_tensor(img, self.size, with_size=True)
        return t, self.captions[i], geometry


def missing_path_message(key: str, path) -> str:
    """The error for a model.path / data.path that does not exist, naming the --set that fixes it."""
    what = {"data": "an imagefolder directory with metadata.jsonl", "model": "a diffusers model directory"}[key]
    if "/path/to/" in str(path):
        return (f"{key}.path is still the config's placeholder {path}: give yours with --set {key}.path=DIR "
                f"({what}; `aptp config show NAME` prints the layout)")
    return f"{key} directory not found: {path} (set {key}.path, e.g. --set {key}.path=DIR: {what})"


class ImageFolderDataset:
    """`root/metadata.jsonl` rows {"file_name": ..., text_column: ...}; images relative to root."""

    def __init__(self, root: str | os.PathLike, size: int, text_column: str = "text", limit: int | None = None):
        root = Path(os.path.expanduser(str(root)))
        if not root.is_dir():
            raise UserError(missing_path_message("data", root))
        meta = root / "metadata.jsonl"
        if not meta.is_file():
            raise UserError(f"{root}: no metadata.jsonl (imagefolder layout: images + metadata.jsonl with "
                            f"file_name and {text_column!r} per line)")
        self.root, self.size = root, int(size)
        self.files: list[Path] = []
        self.captions: list[str] = []
        skipped: list[str] = []
        with open(meta, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{meta} line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or "file_name" not in row or text_column not in row:
                    raise UserError(f"{meta} line {lineno}: needs 'file_name' and {text_column!r} keys")
                text = row[text_column]
                if isinstance(text, list):
                    text = text[0] if text else ""
                if not isinstance(text, str):
                    raise UserError(f"{meta} line {lineno}: {text_column!r} must be a string")
                path = root / row["file_name"]
                try:
                    with Image.open(path) as im:
                        im.verify()
                except Exception as e:  # missing, truncated or not an image: skip and count
                    skipped.append(f"{row['file_name']} ({type(e).__name__})")
                    continue
                self.files.append(path)
                self.captions.append(text)
                if limit is not None and len(self.files) >= limit:
                    break
        self.skipped = len(skipped)
        if skipped:
            log.warning("%s: skipped %d image(s) that could not be read, e.g. %s", root, len(skipped),
                        ", ".join(skipped[:3]))
        if not self.files:
            raise UserError(f"{root}: no readable images ({len(skipped)} skipped)")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.get(i)[:2]

    def get(self, i: int):
        """(pixels, caption, (original h, w, crop top, left))."""
        try:
            with Image.open(self.files[i]) as im:
                t, geometry = to_tensor(im, self.size, with_size=True)
                return t, self.captions[i], geometry
        except OSError as e:
            raise UserError(f"image {self.files[i]} failed to decode: {e}") from None


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.type=hf needs the `datasets` package: {install_hint('data')}") from None
    return datasets


class HFDataset:
    """A `datasets` dataset (hub name from the local cache, or a `save_to_disk` directory) with image and
    text columns."""

    def __init__(self, name_or_path: str, size: int, split: str = "train", image_column: str = "image",
                 text_column: str = "text", limit: int | None = None):
        datasets = _import_datasets()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        p = Path(os.path.expanduser(name_or_path))
        try:
            if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
                ds = datasets.load_from_disk(str(p))
            else:
                ds = datasets.load_dataset(name_or_path, split=split)
        except Exception as e:
            raise UserError(f"cannot load dataset {name_or_path!r}: {str(e).splitlines()[0]}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"dataset {name_or_path!r} has no split {split!r} (has {', '.join(ds)})")
            ds = ds[split]
        for col in (image_column, text_column):
            if col not in ds.column_names:
                raise UserError(f"dataset {name_or_path!r} has no column {col!r} (has {', '.join(ds.column_names)})")
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        if len(ds) == 0:
            raise UserError(f"dataset {name_or_path!r} split {split!r} is empty")
        self.ds, self.size, self.image_column = ds, int(size), image_column
        self.captions = [t[0] if isinstance(t, list) else str(t) for t in ds[text_column]]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        return self.get(i)[:2]

    def get(self, i: int):
        """(pixels, caption, (original h, w, crop top, left))."""
        img = self.ds[int(i)][self.image_column]
        if isinstance(img, dict):  # undecoded Image feature

            img = Image.open(io.BytesIO(img["bytes"])) if img.get("bytes") else Image.open(img["path"])
        elif isinstance(img, str):
            img = Image.open(img)
        elif isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        t, geometry = to_tensor(img, self.size, with_size=True)
        return t, self.captions[i], geometry


def check_data_source(dcfg) -> None:
    """Cheap checks before any model is loaded: the data directory / extra exists."""
    if dcfg.type == "imagefolder":
        root = Path(os.path.expanduser(str(dcfg.path)))
        if not root.is_dir():
            raise UserError(missing_path_message("data", root))
        if not (root / "metadata.jsonl").is_file():
            raise UserError(f"{root}: no metadata.jsonl (imagefolder layout)")
    elif dcfg.type == "hf":
        _import_datasets()


def build_dataset(dcfg, size: int):
    """The training dataset of a DataConfig (training/config.py) at image side `size`."""
    if dcfg.type == "toy":
        return ToyDataset(dcfg.num_samples, seed=dcfg.toy_seed, size=size, world=dcfg.toy_world)
    if dcfg.type == "imagefolder":
        return ImageFolderDataset(dcfg.path, size, text_column=dcfg.text_column, limit=dcfg.num_samples)
    if dcfg.type == "hf":
        return HFDataset(dcfg.path, size, split=dcfg.split, image_column=dcfg.image_column,
                         text_column=dcfg.text_column, limit=dcfg.num_samples)
    raise UserError(f"data.type {dcfg.type!r} is not one of toy, imagefolder, hf")


def collate(dataset, indices, sizes: bool = False):
    """(pixels [B, 3, S, S], captions) of `indices`; with `sizes` also int64 [B, 4] (original h, w, crop
    top, left) per image (a dataset without `get` gives S, S, 0, 0)."""
    if not sizes:
        items = [dataset[int(i)] for i in indices]
        return torch.stack([x for x, _ in items]), [c for _, c in items]
    if hasattr(dataset, "get"):
        items = [dataset.get(int(i)) for i in indices]
    else:
        items = [(*dataset[int(i)], None) for i in indices]
    pixels = torch.stack([x for x, _, _ in items])
    s = pixels.shape[-1]
    geometry = torch.tensor([g if g is not None else (s, s, 0, 0) for _, _, g in items], dtype=torch.long)
    return pixels, [c for _, c, _ in items], geometry


class GlobalBatches:
    """Dataset indices of the global batch of every step: epoch e is `randperm(n)` seeded by (seed, e),
    batches are consecutive chunks of it (the incomplete last chunk is dropped)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        if batch_size > n:
            raise UserError(f"batch size {batch_size} is larger than the dataset ({n} samples)")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.per_epoch = self.n // self.batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(int(step), self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[k * self.batch_size:(k + 1) * self.batch_size]


def local_slice(global_rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's contiguous share of a global-batch tensor (dim 0 divisible by world_size)."""
    n = global_rows.shape[0]
    if n % world_size:
        raise UserError(f"global batch {n} is not divisible by the {world_size} processes")
    m = n // world_size
    return global_rows[rank * m:(rank + 1) * m]
