"""The README's install lines do what they say (slow: each builds a fresh venv from this checkout).

- The runtime + server line (between `<!-- runtime-install -->` markers) makes a venv in which torch,
  diffusers and transformers do not import, and `aptp route`, `aptp generate` and `aptp serve` work on an
  export.
- The GPU runtime line resolves to onnxruntime-gpu and never to onnxruntime (pip's dry-run report).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from engines_export_fixture import ANCHORS, build_export

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
    return re.search(r"```bash\n(.*?)\n```", block, re.S).group(1).strip()


def _venv_size_mb(venv: Path) -> float:
    return sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runtime_install_line_is_torch_free_and_serves(tmp_path):
    line = readme_block("runtime-install")
    venv = tmp_path / "venv"
    # the README's line, verbatim but for the venv's place
    cmd = line.replace(".venv-serve", str(venv))
    subprocess.run(["bash", "-c", cmd], cwd=ROOT, check=True, timeout=1500)
    py, aptp = venv / "bin" / "python", venv / "bin" / "aptp"
    print(f"runtime + server venv: {_venv_size_mb(venv):.0f} MB")
    for heavy in ("torch", "diffusers", "transformers"):
        r = subprocess.run([py, "-c", f"import {heavy}"], capture_output=True, text=True)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, heavy
    r = subprocess.run([aptp, "prune", "--help"], capture_output=True, text=True)
    assert r.returncode == 2 and 'pip install -c constraints/cpu.txt -e ".[full]"' in r.stderr

    export = build_export("pixel").dir
    r = subprocess.run([aptp, "route", "--export", export, "--prompt", ANCHORS[0], "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["expert"] == 0
    r = subprocess.run([aptp, "generate", "--export", export, "--prompt", ANCHORS[1], "--steps", "2",
                        "--out", tmp_path / "images"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "images").glob("*.png"))) == 1

    port = _free_port()
    env = {**os.environ, "APTP_SERVE_PORT": str(port)}
    proc = subprocess.Popen([aptp, "serve", "--export", export], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the server never became ready")
        body = json.dumps({"prompt": ANCHORS[0], "n": 1, "seed": 1, "steps": 2}).encode()
        req = urllib.request.Request(f"{url}/v1/images/generations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            data = json.loads(resp.read())["data"]
        assert len(data) == 1 and data[0]["b64_json"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_gpu_runtime_line_never_installs_cpu_onnxruntime(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    report = tmp_path / "report.json"
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", report,
                    "-e", ".[gpu,serve]"], cwd=ROOT, check=True, timeout=900)
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    assert not {"torch", "diffusers", "transformers"} & names
    shutil.rmtree(venv)
