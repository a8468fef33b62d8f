"""What onnxruntime's CPU-arena shrinkage costs and buys on an export (the server's `--shrink-arena`).

    python -m benchmarks.arena_memory --engines EXPORT --out OUT [--batches 1,2,4,8] [--repeats 12]

Memory: one fresh process per setting (the arena's high-water mark is per process) runs every expert at
each batch size in turn, on a worker thread like the server's, and records resident memory after each
(after glibc malloc_trim, so what remains is held, not merely unreturned). Speed: one process, the setting
flipped between interleaved rounds (`benchmarks.timing.interleaved`), the median time of one 2-step
generation on the first expert (text encoder, 2 UNet calls with classifier-free guidance, VAE decoder) per
batch size. Writes OUT/arena_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from engines import Runtime
from engines.backends import ort as eort
from engines.serving.memory import rss_bytes, trim

from .timing import interleaved, machine


def _memory_run(engines: str, batches: list[int], shrink: bool) -> list[dict]:
    eort.shrink_cpu_arena(shrink)
    rt = Runtime.load(engines, threads=1)
    experts = [e.id for e in rt.manifest.experts]
    out = []

    def work():
        for n in batches:
            for e in experts:
                rt.generate(["a red circle"] * n, steps=2, seed=1, expert=e)
            trim()
            out.append({"batch": n, "rss_mb": rss_bytes() / 2**20})

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--memory-only", choices=("keep", "shrink"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.memory_only:
        print(json.dumps(_memory_run(args.engines, batches, args.memory_only == "shrink")))
        return 0

    memory = {}
    for setting in ("keep", "shrink"):
        res = subprocess.run([sys.executable, "-m", "benchmarks.arena_memory", "--engines", args.engines,
                              "--out", args.out, "--batches", args.batches, "--memory-only", setting],
                             capture_output=True, text=True, check=True)
        memory[setting] = json.loads(res.stdout.strip().splitlines()[-1])
        print(setting, [(m["batch"], round(m["rss_mb"])) for m in memory[setting]], flush=True)

    rt = Runtime.load(args.engines, threads=1)
    expert = rt.manifest.experts[0].id
    speed = {}
    for n in batches:
        prompts = ["a red circle"] * n

        def call(shrink, prompts=prompts):
            eort.shrink_cpu_arena(shrink)
            rt.generate(prompts, steps=2, seed=1, expert=expert)

        t = interleaved({"keep": lambda: call(False), "shrink": lambda: call(True)}, warmup=2,
                        repeats=args.repeats)
        speed[n] = {k: v.as_dict() for k, v in t.items()}
        ratio = t["shrink"].median_ms / t["keep"].median_ms
        speed[n]["shrink_over_keep"] = ratio
        print(f"batch {n}: keep {t['keep'].median_ms:.1f} ms, shrink {t['shrink'].median_ms:.1f} ms "
              f"per 2-step generation (x{ratio:.3f})", flush=True)
    eort.shrink_cpu_arena(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "engines": args.engines, "expert_timed": expert, "memory_mb": memory,
              "speed": speed, "median_ratio": float(np.median([s["shrink_over_keep"] for s in speed.values()]))}
    (out / "arena_memory.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
