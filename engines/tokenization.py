"""Prompt validation and tokenisation with the `tokenizers` library (no transformers).

The export directory carries the text model's `tokenizer.json` (and the router's own when its prompt
encoder is another model, e.g. a CLIP UNet with a MiniLM router); they give two token layouts, both
the ids transformers' tokenizer gives with the same settings:

- UNet context (text encoder): padded to exactly `text_len` and truncated to it
  (transformers: `padding="max_length", truncation=True, max_length=text_len`); with several text
  tokenizers (SDXL, SD3) each to its own length (SD3: 77 for the CLIPs, 256 for T5).
- Router (sentence embedding): truncated to the router's `max_length` (sentence-transformers'
  `max_seq_length`, 256 for MiniLM) and padded to the longest prompt of the batch; mean pooling
  ignores padding, so the embedding does not depend on the batch.

Prompt rules (`clean_prompts`), documented behaviour rather than silent fixes:
- a single string or a list/tuple of strings; anything else, an empty list or a non-string element
  is an error naming the element's index;
- control and format characters (Unicode Cc/Cf, U+FFFD) are removed, tabs and newlines become
  spaces, as BERT's own normaliser does; a prompt that is then empty or only whitespace is an error;
- long prompts are truncated to the token limits above (a 10,000-character prompt keeps its first
  `text_len` tokens for the UNet); prompts over MAX_PROMPT_CHARS characters are refused outright so
  a server cannot be made to tokenise megabytes.
"""

from __future__ import annotations

from .install import install_hint
import os
import unicodedata
from collections.abc import Sequence

import numpy as np

from .errors import BackendError, PromptError

MAX_PROMPT_CHARS = 100_000
_WHITESPACE_CONTROLS = {"\t", "\n", "\r"}


def _clean(text: str) -> str:
    out = []
    for ch in text:
        if ch in _WHITESPACE_CONTROLS:
            out.append(" ")
        elif ch == "\ufffd" or unicodedata.category(ch) in ("Cc", "Cf"):
            continue
        else:
            out.append(ch)
    return "".join(out)


def clean_prompts(prompts: str | Sequence[str]) -> list[str]:
    """Validate prompts and strip control characters; returns a new list (see the module doc)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif not isinstance(prompts, (list, tuple)):
        raise PromptError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise PromptError("no prompts given")
    cleaned = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptError(f"prompt {i}: expected a string, got {type(p).__name__}")
        if len(p) > MAX_PROMPT_CHARS:
            raise PromptError(f"prompt {i}: {len(p)} characters, more than the {MAX_PROMPT_CHARS} accepted")
        c = _clean(p)
        if not c.strip():
            raise PromptError(f"prompt {i}: empty or only whitespace/control characters")
        cleaned.append(c)
    return cleaned


class PromptTokenizer:
    """Token ids and attention masks (int64) for the text encoder and the router.

    Args:
        tokenizer_json: path of a `tokenizers` tokenizer.json (the text encoder's).
        text_len: UNet context length (pad and truncate to exactly this).
        router_max_length: truncation length of the router's prompt encoder.
        router_tokenizer_json: the router's tokenizer.json if it differs (default: the same file).
        tokenizer_json_2: the second text encoder's tokenizer.json (SDXL, SD3), padded and truncated to
            `text_len` like the first unless `lengths` says otherwise.
        tokenizer_json_3: the third's (SD3's T5).
        lengths: tokens per text tokenizer ("json", "json_2", "json_3") where not `text_len` (the manifest's
            tokenizer.lengths).
    """

    def __init__(self, tokenizer_json: str | os.PathLike, text_len: int, router_max_length: int,
                 router_tokenizer_json: str | os.PathLike | None = None,
                 tokenizer_json_2: str | os.PathLike | None = None,
                 tokenizer_json_3: str | os.PathLike | None = None, lengths: dict[str, int] | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - a runtime dependency
            raise BackendError(f'the runtime needs `tokenizers`: {install_hint("cpu")}') from e
        self.text_len = int(text_len)
        self.router_max_length = int(router_max_length)

        def load(path):
            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as e:
                raise BackendError(f"{path}: cannot be read as a tokenizer.json ({e})") from None
            return tok, *self._pad_token(tok, path)

        def load_fixed(path, key):
            tok, pad_id, pad_token = load(path)
            length = int((lengths or {}).get(key, self.text_len))
            tok.enable_truncation(max_length=length)
            tok.enable_padding(length=length, pad_id=pad_id, pad_token=pad_token)
            return tok

        # the text tokenizers by manifest key (json, json_2, json_3), in the text encoder's input order
        self._unet = {key: load_fixed(path, key) for key, path in (
            ("json", tokenizer_json), ("json_2", tokenizer_json_2), ("json_3", tokenizer_json_3)) if path is not None}

        self._router, pad_id, pad_token = load(router_tokenizer_json or tokenizer_json)
        self._router.enable_truncation(max_length=self.router_max_length)
        self._router.enable_padding(pad_id=pad_id, pad_token=pad_token)  # to the longest in the batch

    @staticmethod
    def _pad_token(tok, path) -> tuple[int, str]:
        padding = tok.padding
        if padding and padding.get("pad_token") is not None:
            return int(padding["pad_id"]), padding["pad_token"]
        for candidate in ("[PAD]", "<pad>"):
            idx = tok.token_to_id(candidate)
            if idx is not None:
                return idx, candidate
        raise BackendError(f"{path}: no padding token configured (the exporter writes one into tokenizer.json)")

    @staticmethod
    def _encode(tok, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encs = tok.encode_batch(prompts)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    @property
    def text_keys(self) -> tuple[str, ...]:
        """The text tokenizers' manifest keys, in order ("json", then "json_2" and "json_3" where present)."""
        return tuple(self._unet)

    def unet_tokens(self, prompts: list[str], key: str = "json") -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), each int64 [B, length], of text tokenizer `key` ("json": the first;
        "json_2": SDXL's and SD3's second; "json_3": SD3's T5) for already-cleaned prompts; length is text_len or,
        with per-tokenizer lengths (SD3), the tokenizer's own."""
        if key not in self._unet:
            raise BackendError(f"this export has no text tokenizer {key!r} (it has {', '.join(self._unet)})")
        return self._encode(self._unet[key], prompts)

    def router_tokens(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), each int64 [B, S] with S <= router_max_length."""
        return self._encode(self._router, prompts)
