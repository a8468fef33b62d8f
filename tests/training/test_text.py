"""Text conditioning: token states for the UNet and sentence embeddings equal to sentence-transformers'."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from training.text import SentenceEncoder, TextEncoder  # noqa: E402

CAPTIONS = ["a red circle", "the letter K in red above a small green square", "",
            "three yellow diamonds", "an orange square on a gray background with many extra words " * 3]


@pytest.fixture(scope="module")
def text():
    return TextEncoder()


@pytest.fixture(scope="module")
def sentence():
    return SentenceEncoder()


def test_token_states_shape_padding_and_cache(text):
    h = text.token_states(CAPTIONS)
    assert h.shape == (len(CAPTIONS), 16, 384) and h.dtype == torch.float32
    ids = text.tokenize(CAPTIONS)["input_ids"]
    assert ids.shape == (len(CAPTIONS), 16)  # padded and truncated to exactly 16
    # cached and uncached paths agree, order and duplicates preserved
    fresh = TextEncoder.__new__(TextEncoder)
    fresh.__dict__.update(text.__dict__)
    fresh._cache = None
    again = fresh.token_states(CAPTIONS[::-1] + CAPTIONS[:1])
    assert torch.allclose(again, torch.cat([h.flip(0), h[:1]]), atol=1e-5)
    assert torch.equal(text.uncond(3), h[2:3].expand(3, -1, -1))
    # different captions give different contexts
    assert (h[0] - h[1]).abs().max() > 1e-2
    with pytest.raises(TypeError):
        text.token_states("a red circle")


def test_token_states_equal_plain_transformers(text):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(text.model_dir))
    model = AutoModel.from_pretrained(str(text.model_dir)).eval()
    enc = tok(CAPTIONS[:3], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    assert torch.allclose(text.token_states(CAPTIONS[:3]), ref, atol=1e-5)


def test_sentence_encoder_equals_sentence_transformers(sentence):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(sentence.model_dir), device="cpu")
    ref = st.encode(CAPTIONS, normalize_embeddings=True, convert_to_tensor=True)
    got = sentence.encode(CAPTIONS)
    assert got.shape == (len(CAPTIONS), sentence.dim) and sentence.dim == 384
    assert torch.allclose(got, ref.cpu().float(), atol=1e-5), (got - ref).abs().max()
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(CAPTIONS)), atol=1e-5)
    # batch composition does not change an embedding (padding is masked out)
    assert torch.allclose(sentence._compute(CAPTIONS[:1]), got[:1], atol=1e-5)
