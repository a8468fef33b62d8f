"""Quality against MACs on the toy: dense, routed mixture, a static K = 1 model at the mixture's MACs, and each
expert on its own prompts, with the toy CLIP (CLIP score, CMMD, FD-CLIP).

    python -m benchmarks.toy_eval --demo aptp-demo --out runs/toy_eval -n 1000 --steps 10

--demo is a finished `aptp demo` directory (its run/ and export/ with the dense model). The K = 1 run is
pruned with the demo run's resolved config (same steps, data, losses) with router.num_experts=1 and the
budget set to the mixture's mean MACs fraction on the evaluation captions (or --k1-budget), fine-tuned
with the same per-expert steps, and exported to OUT/k1_export. Each stage is reused when complete.
Then `benchmarks.evaluate.evaluate` writes OUT/eval/eval.json, eval.md, quality_vs_macs.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from aptp_export.export_run import export_run

from engines import Runtime
from training.config import load_config
from training.finetune import run_finetune
from training.prune import run_prune

from .evaluate import EvalConfig, evaluate, load_data


def mixture_mean_macs(export_dir, captions: list[str]) -> float:
    """Mean MACs fraction of the routed experts over `captions`."""
    rt = Runtime.load(export_dir)
    frac = np.asarray([e.macs_fraction for e in rt.manifest.experts])
    return float(frac[rt.route(captions)].mean())


def k1_export(demo: Path, out: Path, budget: float) -> Path:
    """Prune, fine-tune and export a K = 1 run with the demo run's config at `budget` (each stage reused)."""
    run = out / "k1_run"
    if not (run / "prune" / "summary.json").is_file():
        cfg = load_config(demo / "run" / "config.yaml",
                          overrides=["router.num_experts=1", f"prune.budget={budget:.4f}", "name=k1",
                                     f"runs_dir={out}"])
        run_prune(cfg, run, resume=(run / "config.yaml").is_file())
    if not (run / "experts" / "experts.json").is_file():
        run_finetune(run, resume=True)
    exp = out / "k1_export"
    if not (exp / "manifest.json").is_file():
        export_run(run, exp)
    return exp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="a finished `aptp demo` output directory")
    p.add_argument("--out", default="runs/toy_eval")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=25, help="denoising steps for every model")
    p.add_argument("--guidance", type=float, default=None, help="default: the teacher's sampling.json")
    p.add_argument("--k1-budget", type=float, default=None, help="default: the mixture's mean MACs fraction")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads per session")
    p.add_argument("--models", default="dense,routed")
    args = p.parse_args(argv)
    demo, out = Path(args.demo), Path(args.out)
    data = load_data("toy", args.n)
    budget = args.k1_budget or mixture_mean_macs(demo / "export", data.captions)
    print(f"K = 1 budget {budget:.4f}", flush=True)
    static = k1_export(demo, out, budget)
    guidance = args.guidance
    if guidance is None:
        from training.toy import teacher_dir

        rec = teacher_dir() / "sampling.json"
        guidance = float(json.loads(rec.read_text()).get("guidance_scale", 7.5)) if rec.is_file() else 7.5
    res = evaluate(EvalConfig(engines=str(demo / "export"), static=str(static), models=args.models, n=args.n,
                              steps=args.steps, guidance=guidance, out=str(out / "eval"), threads=args.threads,
                              info={"k1_budget": budget}))
    print((out / "eval" / "eval.md").read_text())
    print(f"done in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
