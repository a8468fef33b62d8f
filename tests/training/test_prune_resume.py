"""A pruning run killed with SIGKILL midway and resumed with --resume equals an uninterrupted run, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from prune_fixtures import tiny_config, write_toy_model


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    model = write_toy_model(tmp_path / "model")
    cfg = tiny_config(model, tmp_path / "runs", prune={"steps": 40, "warmup_steps": 8, "batch_size": 8, "lr": 0.1,
                                                       "codes_lr": 0.5, "checkpoint_every": 4})
    cfg["data"]["embedding_cache"] = str(tmp_path / "cache")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def cmd(run, *extra):
        return [sys.executable, "-m", "aptp", "prune", "--config", str(tmp_path / "cfg.yaml"),
                "--no-progress", "--run-dir", str(tmp_path / run), *extra]

    full = subprocess.run(cmd("full"), env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    # start, wait for a checkpoint past the warm-up, then SIGKILL (no chance to clean up)
    proc = subprocess.Popen(cmd("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "prune" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 12:
            break
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert 12 <= killed_at < 40
    assert not (tmp_path / "killed" / "prune" / "router.json").exists()

    res = subprocess.run(cmd("killed", "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for f in ("router.safetensors", "codes.safetensors"):
        a = load_file(str(tmp_path / "full" / "prune" / f))
        b = load_file(str(tmp_path / "killed" / "prune" / f))
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
    # the step log reads as one run, identical to the uninterrupted one
    logs = [(tmp_path / r / "prune" / "log.jsonl").read_text() for r in ("full", "killed")]
    assert logs[0] == logs[1]
