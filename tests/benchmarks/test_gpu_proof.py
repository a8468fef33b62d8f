"""benchmarks/gpu_proof.py: documented by --help; on a machine without a usable GPU it stops at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from engines.backends.cuda import device_info
from engines.errors import BackendError

ROOT = Path(__file__).resolve().parents[2]


def _has_gpu() -> bool:
    try:
        device_info()
    except BackendError:
        return False
    return True


def test_help_documents_the_proof():
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_proof", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    for words in ("8 minutes", "--backend tensorrt", ">= 40 dB", "CUDA events", "pass/fail", "--run"):
        assert words in out.stdout, words


@pytest.mark.skipif(_has_gpu(), reason="a GPU is usable here: the proof would run")
def test_stops_at_once_without_a_gpu(tmp_path):
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_proof", "--out", str(tmp_path / "proof")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("gpu_proof: no GPU usable here, nothing done:") and out.stderr.count("\n") == 1
    assert not (tmp_path / "proof").exists()
    assert time.perf_counter() - t < 60
