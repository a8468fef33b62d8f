"""Router prompt embeddings, cached on disk per dataset (safetensors keyed by caption hash).

    emb = prompt_embeddings(captions, cache_dir, encoder_dir=None)   # float32 [N, E], L2-normalised

The cache file `cache_dir/prompts-<encoder>-<dataset>.safetensors` holds the embeddings of the
dataset's distinct captions and their sha256 hashes; it is reused only when the hashes match, so a
changed dataset or encoder never reads stale rows. The frozen sentence encoder (training/text.py) is
loaded only on a cache miss.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engines.fileio import atomic_path

from .text import SentenceEncoder, default_model_dir


def caption_hash(caption: str) -> bytes:
    return hashlib.sha256(caption.encode("utf-8")).digest()[:16]


def encoder_key(encoder_dir: str | os.PathLike | None) -> str:
    """A short id of a sentence-encoder directory (name + config contents)."""

    d = Path(encoder_dir) if encoder_dir is not None else default_model_dir()
    h = hashlib.sha256(d.name.encode())
    for f in ("config.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        if (d / f).is_file():
            h.update((d / f).read_bytes())
    return h.hexdigest()[:12]


def prompt_embeddings(captions: list[str], cache_dir: str | os.PathLike | None, encoder_dir=None,
                      device="cpu", batch_size: int = 256, progress: bool = False, write: bool = True) -> torch.Tensor:
    """Sentence embeddings [N, E] of `captions` (duplicates encoded once), through the on-disk cache.

    Args: cache_dir: directory of cache files (None = no cache); encoder_dir: sentence-transformers dir
    (None = packaged MiniLM); write: save a new cache file on a miss (only the main process should).
    """

    uniq = list(dict.fromkeys(captions))
    hashes = torch.tensor(np_frombytes([caption_hash(c) for c in uniq]), dtype=torch.uint8)
    ds_key = hashlib.sha256(hashes.numpy().tobytes()).hexdigest()[:16]
    path = Path(cache_dir) / f"prompts-{encoder_key(encoder_dir)}-{ds_key}.safetensors" if cache_dir else None
    emb = None
    if path is not None and path.is_file():
        t = load_file(str(path))
        if t["hashes"].shape == hashes.shape and torch.equal(t["hashes"], hashes):
            emb = t["embeddings"]
    if emb is None:

        enc = SentenceEncoder(encoder_dir, device=device, cache=False)
        parts = []
        for i in tqdm(range(0, len(uniq), batch_size), desc="prompt embeddings", disable=not progress):
            parts.append(enc.encode(uniq[i:i + batch_size]).cpu())
        emb = torch.cat(parts).float().contiguous()
        if path is not None and write:

            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"embeddings": emb, "hashes": hashes}, str(tmp),
                          metadata={"encoder": json.dumps(str(encoder_dir) if encoder_dir else "packaged:all-MiniLM-L6-v2")})
    row = {c: i for i, c in enumerate(uniq)}
    return emb[torch.tensor([row[c] for c in captions], dtype=torch.long)]


def np_frombytes(items: list[bytes]):
    return np.frombuffer(b"".join(items), dtype=np.uint8).reshape(len(items), -1).copy()
