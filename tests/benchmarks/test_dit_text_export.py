"""benchmarks.dit_text_export builds SD3-medium's real text encoders: their parameter counts (on the meta device)
are the released checkpoints' (CLIP-L text with projection 123,650,304; OpenCLIP bigG text with projection
694,659,840; T5 v1.1 XXL encoder 4,762,310,656), and it refuses a T5 export that cannot fit the machine."""

from __future__ import annotations

from benchmarks import dit_text_export


def test_real_encoder_sizes():
    assert dit_text_export.meta_params() == {"clip_l": 123_650_304, "clip_g": 694_659_840, "t5_xxl": 4_762_310_656}


def test_refuses_what_does_not_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dit_text_export, "available_gb", lambda: 20.0)
    assert dit_text_export.main(["--out", str(tmp_path), "--t5"]) == 2
    assert "refused: clip_l, clip_g, t5_xxl need about 56 GB" in capsys.readouterr().err
    assert not (tmp_path / "text_encoder.onnx").exists()
