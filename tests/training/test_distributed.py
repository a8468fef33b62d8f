"""`aptp prune` under `accelerate launch --num_processes 2 --cpu` (gloo) routes exactly like one process
with the same global batch and seed: Sinkhorn and the contrastive loss see the whole global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from prune_fixtures import tiny_config, write_toy_model


def _run(cmd, cwd, env):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate CLI not installed")
def test_two_processes_route_like_one(tmp_path):
    from safetensors.torch import load_file

    model = write_toy_model(tmp_path / "model")
    # the toy config's options too: codes from the predictor (k-means), noise annealing, routing loss
    cfg = tiny_config(model, tmp_path / "runs", prune={"steps": 10, "warmup_steps": 2, "batch_size": 8, "lr": 0.2,
                                                       "codes_lr": 1.0, "checkpoint_every": 100,
                                                       "losses": {"routing": 1.0}},
                      router={"num_experts": 4, "codes_init": "predictor", "noise_final_scale": 0.0})
    cfg["data"]["embedding_cache"] = str(tmp_path / "cache")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["-m", "aptp", "prune", "--config", str(tmp_path / "cfg.yaml"), "--no-progress", "--run-dir"]
    _run([sys.executable, *args, str(tmp_path / "one")], tmp_path, env)
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    _run([accelerate, "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--cpu", *args, str(tmp_path / "two")], tmp_path, env)

    logs = [[json.loads(x) for x in (tmp_path / r / "prune" / "log.jsonl").read_text().splitlines()]
            for r in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 10
    routed = 0
    for a, b in zip(*logs, strict=True):
        assert a["phase"] == b["phase"]
        assert a.get("assign") == b.get("assign"), a["step"]  # every sample to the same code at every step
        if "code_macs" in a:
            routed += 1
            assert torch.allclose(torch.tensor(a["code_macs"]), torch.tensor(b["code_macs"]), atol=1e-5)
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"]))
    assert routed == 8
    # the codes moved and differ (routing is not trivially tied), in both runs identically
    assert len({round(m, 4) for m in logs[0][-1]["code_macs"]}) > 1
    s1, s2 = (json.loads((tmp_path / r / "prune" / "summary.json").read_text()) for r in ("one", "two"))
    assert s1["shares"] == s2["shares"]
    for f in ("router.safetensors", "codes.safetensors"):
        a, b = load_file(str(tmp_path / "one" / "prune" / f)), load_file(str(tmp_path / "two" / "prune" / f))
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), (f, k)
