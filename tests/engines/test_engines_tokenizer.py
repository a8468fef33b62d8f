"""engines.tokenization: same ids as transformers' tokenizer, and the documented prompt rules."""

from __future__ import annotations

import numpy as np
import pytest
from engines_export_fixture import hf_tokenizer, minilm_dir

from engines.errors import PromptError
from engines.tokenization import MAX_PROMPT_CHARS, PromptTokenizer, clean_prompts

PROMPTS = [
    "a red circle",
    "The Letter K in RED above a small green square",
    "Crème brûlée on a café table, naïve style",           # accents: MiniLM lowercases, keeps accents
    "東京 tower at night",                                   # CJK characters are split per character
    "emoji 🙂 and punctuation!!! (yes) -- 3.5 cm",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen",
    ("supercalifragilistic" * 8) + " word",                  # > 100 chars in one word -> [UNK]
    "x",
]


@pytest.fixture(scope="module")
def tok():
    return PromptTokenizer(minilm_dir() / "tokenizer.json", text_len=16, router_max_length=256)


def test_unet_tokens_match_transformers(tok):
    ids, mask = tok.unet_tokens(PROMPTS)
    ref = hf_tokenizer()(PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="np")
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), 16)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    # the unconditional prompt "" is [CLS] [SEP] + padding
    ids0, mask0 = tok.unet_tokens([""])
    np.testing.assert_array_equal(ids0, hf_tokenizer()([""], padding="max_length", max_length=16,
                                                       return_tensors="np")["input_ids"])
    assert mask0.sum() == 2


def test_router_tokens_match_transformers(tok):
    long = " ".join(["word"] * 400)
    prompts = PROMPTS + [long]
    ids, mask = tok.router_tokens(prompts)
    ref = hf_tokenizer()(prompts, padding=True, truncation=True, max_length=256, return_tensors="np")
    assert ids.shape == (len(prompts), 256)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    # padded to the longest prompt of the batch only
    short_ids, _ = tok.router_tokens(PROMPTS[:2])
    assert short_ids.shape[1] == max(len(hf_tokenizer()(p)["input_ids"]) for p in PROMPTS[:2])


def test_clean_prompts_rules():
    assert clean_prompts("a cat") == ["a cat"]
    assert clean_prompts(("a", "b")) == ["a", "b"]
    assert clean_prompts(["a\tred\ncircle\r"]) == ["a red circle "]
    assert clean_prompts(["red\x00\x1b[31m circle\u200b\ufffd"]) == ["red[31m circle"]
    for bad, match in [([], "no prompts"), ([""], "prompt 0: empty"), (["ok", "   "], "prompt 1: empty"),
                       (["\x00\x07"], "prompt 0: empty"), (["a", None], "prompt 1: expected a string, got NoneType"),
                       (["a", b"bytes"], "prompt 1: expected a string, got bytes"), (42, "string or a list"),
                       (["y" * (MAX_PROMPT_CHARS + 1)], "more than")]:
        with pytest.raises(PromptError, match=match):
            clean_prompts(bad)
    # a 10,000-character prompt is accepted (and truncated later by the tokenizer)
    assert len(clean_prompts(["z " * 5000])[0]) == 10_000


def test_control_characters_match_what_bert_would_do(tok):
    """Stripping Cc/Cf ourselves gives the ids transformers gives on the raw prompt (BERT cleans the same)."""
    raw = ["a red\x00 circle\x07 on\tblue", "zero\u200bwidth"]
    ids, _ = tok.unet_tokens(clean_prompts(raw))
    ref = hf_tokenizer()(raw, padding="max_length", truncation=True, max_length=16, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
