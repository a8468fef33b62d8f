"""The runtime imports and runs with torch, diffusers and transformers absent.

A subprocess installs a meta-path finder that raises ImportError for those packages (and for
aptp_export / training, which engines must not import either), then loads a real export, routes
and generates. The `aptp route` / `aptp generate` verbs are run the same way with only the heavy
packages blocked (they live in aptp_export but may import nothing but engines and the stdlib).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from engines_export_fixture import ANCHORS

pytestmark = pytest.mark.usefixtures("one_thread")

HEAVY = ["torch", "torchvision", "diffusers", "transformers", "accelerate", "sentence_transformers",
         "torch_pruning", "safetensors", "onnx", "onnxscript", "matplotlib"]

BLOCKER = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = set(json.loads(sys.argv[1]))
    ATTEMPTS = []
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                ATTEMPTS.append(name)
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Blocker())
""")

ENGINES_SCRIPT = BLOCKER + textwrap.dedent("""
    import numpy as np
    import engines
    from engines import Runtime
    rt = Runtime.load(sys.argv[2])
    ids = rt.route(json.loads(sys.argv[3]))
    res = rt.generate_with_info(json.loads(sys.argv[3]), steps=2, seed=0)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"ids": ids, "experts": res.expert_ids, "sizes": [im.size for im in res.images],
                      "loaded": loaded, "attempts": sorted(set(ATTEMPTS))}))
""")

CLI_SCRIPT = BLOCKER + textwrap.dedent("""
    from aptp.cli import main
    code = main(json.loads(sys.argv[2]))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"code": code, "loaded": loaded}))
""")




def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_engines_run_without_torch(pixel):
    blocked = [*HEAVY, "aptp_export", "training", "benchmarks"]
    out = _run(ENGINES_SCRIPT, json.dumps(blocked), str(pixel.dir), json.dumps(list(ANCHORS)))
    assert out["loaded"] == []
    assert out["ids"] == [0, 1] and out["experts"] == [0, 1]
    assert out["sizes"] == [[16, 16], [16, 16]]


def test_blocker_really_blocks():
    """The test above could pass vacuously if the finder did nothing: importing torch must fail."""
    script = BLOCKER + "\ntry:\n    import torch\n    print('imported')\nexcept ImportError:\n    print('blocked')\n"
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(["torch"])], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "blocked"


def test_route_and_generate_verbs_without_torch(pixel, tmp_path):
    out = _run(CLI_SCRIPT, json.dumps(HEAVY),
               json.dumps(["route", "--engines", str(pixel.dir), "--prompt", ANCHORS[0], "--json"]))
    assert out == {"code": 0, "loaded": []}
    out = _run(CLI_SCRIPT, json.dumps(HEAVY),
               json.dumps(["generate", "--engines", str(pixel.dir), "--prompt", ANCHORS[1], "--steps", "2",
                           "--out", str(tmp_path / "imgs")]))
    assert out == {"code": 0, "loaded": []}
    assert (tmp_path / "imgs" / "000_expert1.png").is_file()


SERVER_SCRIPT = BLOCKER + textwrap.dedent("""
    from starlette.testclient import TestClient
    from engines import Runtime
    from engines.serving.batching import Batcher
    from engines.serving.config import ServeConfig
    from engines.server import create_app
    cfg = ServeConfig(default_steps=2)
    batcher = Batcher(Runtime.load(sys.argv[2]), cfg)
    with TestClient(create_app(batcher, cfg, warm_up=False), base_url="http://127.0.0.1") as client:
        batcher.warm_up()
        r = client.post("/v1/images/generations", json={"prompt": sys.argv[3], "n": 2, "seed": 1})
        codes = [r.status_code, client.get("/readyz").status_code, client.get("/metrics").status_code]
    import aptp.commands.serve  # the verb's module too
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"codes": codes, "seeds": [d["seed"] for d in r.json()["data"]], "loaded": loaded}))
""")


def test_server_runs_without_torch(pixel):
    """engines.server and the FastAPI app import and answer with torch, diffusers, transformers (and our
    other packages, for engines.server) absent. The real server process is run the same way by
    tests/engines/test_server.py."""
    out = _run(SERVER_SCRIPT, json.dumps([*HEAVY, "training", "benchmarks"]), str(pixel.dir), ANCHORS[0])
    assert out == {"codes": [200, 200, 200], "seeds": [1, 2], "loaded": []}


def test_server_without_the_serving_extra_names_it():
    script = BLOCKER + textwrap.dedent("""
        try:
            import engines.server
        except Exception as e:
            print(json.dumps({"error": str(e)}))
    """)
    out = _run(script, json.dumps(["fastapi"]))
    assert 'pip install -e ".[serve]"' in out["error"] and "fastapi" in out["error"]
