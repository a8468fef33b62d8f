"""`aptp route` and `aptp generate` on a tiny export: output, files, one-line errors (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from engines_export_fixture import ANCHORS, copy_export
from PIL import Image

from aptp.cli import main
from engines import Runtime

pytestmark = pytest.mark.usefixtures("one_thread")





def test_route_prints_expert_macs_and_scores(pixel, capsys):
    assert main(["route", "--export", str(pixel.dir), "--prompt", ANCHORS[0], "--prompt", ANCHORS[1]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("expert 0  macs ") and lines[1].startswith("expert 1  macs ")
    assert main(["route", "--export", str(pixel.dir), "--prompt", ANCHORS[1], "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    m = Runtime.load(pixel.dir).manifest
    assert rec["expert"] == 1 and rec["macs_fraction"] == round(m.experts[1].macs_fraction, 4)
    assert len(rec["scores"]) == 2 and rec["scores"][1] > rec["scores"][0]


def test_generate_writes_pngs_and_mapping(pixel, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{ANCHORS[1]}\n\n{ANCHORS[0]}\n")
    out = tmp_path / "out"
    code = main(["generate", "--export", str(pixel.dir), "--prompt-file", str(prompts), "--out", str(out),
                 "--steps", "3", "--guidance", "5", "--seed", "7", "--batch-size", "1", "--scheduler", "euler"])
    assert code == 0
    mapping = json.loads((out / "images.json").read_text())
    recs = mapping["images"]
    assert [r["expert"] for r in recs] == [1, 0] and [r["seed"] for r in recs] == [7, 8]
    assert {r["scheduler"] for r in recs} == {"euler"} and recs[0]["prompt"] == ANCHORS[1]
    for r in recs:
        img = Image.open(out / r["file"])
        assert img.size == (16, 16) and img.mode == "RGB"
    # the CLI writes what the library generates
    lib = Runtime.load(pixel.dir).generate([ANCHORS[1]], steps=3, guidance_scale=5, seed=7, scheduler="euler")[0]
    assert np.array_equal(np.asarray(lib), np.asarray(Image.open(out / recs[0]["file"])))


@pytest.mark.parametrize("argv_tail, message", [
    (["--prompt", "   "], "prompt 0: empty"),
    ([], "give at least one --prompt"),
    (["--prompt", "a", "--steps", "0"], "steps must be"),
    (["--prompt", "a", "--expert", "x"], "--expert must be"),
])
def test_generate_user_errors_are_one_line(pixel, tmp_path, capsys, argv_tail, message):
    code = main(["generate", "--export", str(pixel.dir), "--out", str(tmp_path / "o"), *argv_tail])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists(), "nothing is written when generation is refused"


def test_corrupted_export_is_one_line_error(pixel, tmp_path, capsys):
    d = copy_export(pixel, tmp_path / "x")
    p = d / "experts" / "expert_00.onnx"
    p.write_bytes(p.read_bytes()[:-10])
    code = main(["route", "--export", str(d), "--prompt", "a"])
    err = capsys.readouterr().err
    assert code == 2 and "expert_00.onnx: truncated" in err and len(err.strip().splitlines()) == 1
    code = main(["route", "--export", str(tmp_path / "missing"), "--prompt", "a"])
    assert code == 2 and "not a directory" in capsys.readouterr().err
