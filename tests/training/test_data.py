"""Datasets: imagefolder (errors and skips), `datasets` datasets, toy world, batches, embedding cache."""

import json
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from engines.errors import UserError
from training.data import GlobalBatches, HFDataset, ImageFolderDataset, ToyDataset, local_slice, to_tensor


def _folder(tmp_path, n=5, size=(40, 24)):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def test_to_tensor_resizes_shorter_side_and_centre_crops():
    arr = np.zeros((20, 60, 3), dtype=np.uint8)  # H=20, W=60
    arr[:, 20:40] = 255                           # white centre third
    t = to_tensor(arr, 20)
    assert t.shape == (3, 20, 20) and t.dtype == torch.float32
    assert torch.allclose(t, torch.ones_like(t))  # the centre crop is exactly the white third
    t2 = to_tensor(np.full((64, 64, 3), 0, np.uint8), 16)
    assert t2.shape == (3, 16, 16) and torch.allclose(t2, -torch.ones_like(t2))


def test_imagefolder_reads_images_and_captions(tmp_path):
    _folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, 16)
    assert len(ds) == 5 and ds.captions[3] == "caption 3" and ds.skipped == 0
    x, c = ds[2]
    assert x.shape == (3, 16, 16) and c == "caption 2" and -1 <= x.min() and x.max() <= 1


def test_imagefolder_missing_dir_and_missing_metadata(tmp_path):
    with pytest.raises(UserError, match="data directory not found"):
        ImageFolderDataset(tmp_path / "nope", 16)
    with pytest.raises(UserError, match="no metadata.jsonl"):
        ImageFolderDataset(tmp_path, 16)


def test_imagefolder_broken_json_line_is_an_error_naming_the_line(tmp_path):
    _folder(tmp_path)
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    lines[2] = '{"file_name": "2.png", "text": '
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="line 3: not valid JSON"):
        ImageFolderDataset(tmp_path, 16)


def test_imagefolder_missing_key_is_an_error(tmp_path):
    _folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "caption": "x"}\n')
    with pytest.raises(UserError, match="line 1: needs 'file_name' and 'text'"):
        ImageFolderDataset(tmp_path, 16)


def test_imagefolder_undecodable_and_missing_images_are_skipped_and_counted(tmp_path, caplog):
    _folder(tmp_path, n=6)
    (tmp_path / "1.png").write_bytes(b"this is not a png")
    (tmp_path / "4.png").unlink()
    with caplog.at_level(logging.WARNING, logger="aptp.data"):
        ds = ImageFolderDataset(tmp_path, 16)
    assert len(ds) == 4 and ds.skipped == 2
    assert ds.captions == ["caption 0", "caption 2", "caption 3", "caption 5"]
    assert "skipped 2 image(s)" in caplog.text and "1.png" in caplog.text
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no readable images"):
        ImageFolderDataset(tmp_path, 16)


def test_hf_dataset_from_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(4)]
    ds = datasets.Dataset.from_dict({"img": imgs, "caption": ["a", "b", "c", "d"]},
                                    features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    h = HFDataset(str(tmp_path / "ds"), 16, image_column="img", text_column="caption")
    assert len(h) == 4 and h.captions == ["a", "b", "c", "d"]
    x, c = h[1]
    assert x.shape == (3, 16, 16) and c == "b"
    assert torch.allclose(x, to_tensor(imgs[1], 16))
    with pytest.raises(UserError, match="no column 'text'"):
        HFDataset(str(tmp_path / "ds"), 16, image_column="img", text_column="text")


def test_hf_dataset_without_the_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(UserError, match=r'pip install -e "\.\[data\]"'):
        HFDataset("anything", 16)


def test_toy_dataset_is_deterministic():
    a, b = ToyDataset(10, seed=3), ToyDataset(10, seed=3)
    assert a.captions == b.captions and np.array_equal(a.images, b.images)
    x, c = a[4]
    assert x.shape == (3, 32, 32) and c == a.captions[4] and a.difficulty[4] in ("easy", "medium", "hard")
    assert ToyDataset(4, seed=3, size=16)[0][0].shape == (3, 16, 16)


def test_global_batches_epochs_and_slices():
    gb = GlobalBatches(10, 4, seed=7)
    assert gb.per_epoch == 2
    e0 = torch.cat([gb.indices(0), gb.indices(1)])
    assert len(set(e0.tolist())) == 8
    assert torch.equal(GlobalBatches(10, 4, seed=7).indices(3), gb.indices(3))  # pure function of the step
    assert not torch.equal(gb.indices(0), gb.indices(2))  # a new permutation per epoch
    rows = torch.arange(8)
    assert torch.equal(torch.cat([local_slice(rows, r, 2) for r in range(2)]), rows)
    with pytest.raises(UserError, match="not divisible"):
        local_slice(torch.arange(6), 0, 4)
    with pytest.raises(UserError, match="larger than the dataset"):
        GlobalBatches(3, 4)


def test_embedding_cache_roundtrip_and_invalidation(tmp_path, monkeypatch):
    from training import embeddings
    from training.text import SentenceEncoder

    caps = ["a red circle", "the letter K in blue", "a red circle"]
    e1 = embeddings.prompt_embeddings(caps, tmp_path)
    assert e1.shape == (3, 384) and torch.equal(e1[0], e1[2])
    assert torch.allclose(e1.norm(dim=1), torch.ones(3), atol=1e-5)
    files = list(tmp_path.glob("prompts-*.safetensors"))
    assert len(files) == 1
    # a cache hit does not load the encoder
    import training.text as text_mod

    def boom(*a, **k):
        raise AssertionError("encoder loaded on a cache hit")

    monkeypatch.setattr(text_mod, "SentenceEncoder", boom)
    assert torch.equal(embeddings.prompt_embeddings(caps, tmp_path), e1)
    monkeypatch.setattr(text_mod, "SentenceEncoder", SentenceEncoder)
    # another dataset gets its own file; values agree with a direct encode
    e2 = embeddings.prompt_embeddings(["a blue background"], tmp_path)
    assert len(list(tmp_path.glob("prompts-*.safetensors"))) == 2
    direct = SentenceEncoder(cache=False).encode(["a blue background", "a red circle"])
    assert torch.allclose(e2[0], direct[0], atol=1e-6) and torch.allclose(e1[0], direct[1], atol=1e-6)
