"""The method's promise on the toy, measured: routed experts vs one static pruned model at equal mean
inference MACs (+-1 %) and equal total fine-tuning compute, over several training seeds.

    python -m benchmarks.toy_promise --out runs/promise --seeds 0,1,2 [-n 1000] [--set KEY=VALUE ...]

Per seed: a routed run (the demo config + --set overrides, `seed` = the seed), the matched static K = 1
run (benchmarks.static_baseline), held-out MSE to the dense teacher per prompt, overall and per category;
with --oracle also the oracle bound and router health of the seed's routed run; with --clip N the toy
CLIP score of N generated images per model (routed export, static export, dense). Every stage is reused
when complete. Writes OUT/promise.json and OUT/promise.md (mean +- std over seeds and each seed's
figures).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from engines.fileio import write_json, write_text
from training.config import load_config, resolve_config_arg
from training.export_run import export_run
from training.finetune import run_finetune
from training.prune import run_prune
from training.rundir import RunDir

from .diagnostics import CATEGORY_KEYS, heldout, oracle_bound, router_health
from .static_baseline import compare, matched_static, paired_summary
from .timing import machine


def routed_run(out: Path, config: str, seed: int, overrides: list[str]) -> Path:
    run = RunDir(out / "routed")
    if not run.is_pruned():
        cfg = load_config(resolve_config_arg(config),
                          overrides=[*overrides, f"seed={seed}", "name=routed", f"runs_dir={out}"])
        run_prune(cfg, run.root, resume=run.has_config())
    if not run.is_finetuned():
        run_finetune(run.root, resume=True)
    return run.root


def clip_scores(routed: Path, static_export: Path, out: Path, n: int, steps: int, world: str = "v1") -> dict:
    from .evaluate import EvalConfig, evaluate

    exp = out / "routed_export"
    if not (exp / "manifest.json").is_file():
        export_run(routed, exp, with_dense=True)
    res = evaluate(EvalConfig(engines=str(exp), static=str(static_export), models="dense,routed,static", n=n,
                              data="toy" if world == "v1" else f"toy-{world}",
                              steps=steps, guidance=3.0, out=str(out / "eval")))
    return {r["model"]: r for r in res["models"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/promise")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("-n", type=int, default=1000, help="held-out prompts")
    p.add_argument("--config", default="demo")
    p.add_argument("--set", action="append", default=[], help="override for the routed run, KEY=VALUE")
    p.add_argument("--oracle", action="store_true", help="also the oracle bound and router health per seed")
    p.add_argument("--clip", type=int, default=0, help="toy CLIP score on this many generated images per model")
    p.add_argument("--clip-steps", type=int, default=10)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = load_config(resolve_config_arg(args.config), overrides=args.set).data.toy_world
    caps = heldout(args.n, world=world).captions
    results = {"settings": vars(args), "machine": machine(), "seeds": {}}
    path = out / "promise.json"
    if path.is_file():
        results["seeds"] = json.loads(path.read_text()).get("seeds", {})
    for seed in [int(s) for s in args.seeds.split(",")]:
        t0 = time.perf_counter()
        sd = out / f"seed{seed}"
        routed = routed_run(sd, args.config, seed, args.set)
        static = matched_static(routed, sd / "static", caps)
        cmp = compare(routed, static["run"], n=args.n)
        rec = {"compute": static, "models": cmp["models"], "by_category": cmp["by_category"],
               "paired": paired_summary(cmp), "need": json.loads(RunDir(routed).prune_summary.read_text()).get("need")}
        if args.oracle:
            orc = oracle_bound(routed, sd / "oracle", static=static["run"], n=args.n)
            rec["oracle"] = {k: orc[k] for k in ("router", "oracle", "static", "captured", "oracle_unconstrained")
                             if k in orc}
            h = router_health(routed, sd / "health", n=args.n)
            rec["health"] = {k: h[k] for k in ("max_share", "margin_median", "entropy_median", "expert_macs",
                                               "shares")}
            rec["health"]["macs_by_difficulty"] = {c: v["mean_macs"] for c, v in h["by_difficulty"].items()}
        if args.clip:
            rec["clip"] = clip_scores(routed, Path(static["export"]), sd, args.clip, args.clip_steps, world)
        rec["seconds"] = time.perf_counter() - t0
        results["seeds"][str(seed)] = rec
        write_json(path, results)
        m = rec["models"]
        print(f"[seed {seed}] routed {m['routed']['to_teacher']:.5f} @ {m['routed']['macs']:.4f} vs static "
              f"{m['static']['to_teacher']:.5f} @ {m['static']['macs']:.4f} (compute ratio "
              f"{static['compute_ratio']:.3f}); routed better on {rec['paired']['routed_better_share']:.0%}", flush=True)
    write_text(out / "promise.md", promise_markdown(results))
    print((out / "promise.md").read_text())
    return 0


def _ms(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.5f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.5f}"


def promise_markdown(res: dict) -> str:
    seeds = res["seeds"]
    names = sorted(seeds, key=int)
    lines = ["# Routed vs static at equal MACs and equal fine-tuning compute (toy)", "",
             f"Seeds {', '.join(names)}; held-out prompts {res['settings']['n']}; overrides "
             f"`{' '.join(res['settings']['set']) or '(none)'}` on `{res['settings']['config']}`. "
             "Error = MSE to the dense teacher's output (timesteps 200/500/800, fixed noise).", "",
             "| model | mean MACs | MSE to teacher (mean ± std over seeds) | per seed | fine-tuning compute ratio |",
             "|---|---|---|---|---|"]
    for name in ("routed", "static"):
        errs = [seeds[s]["models"][name]["to_teacher"] for s in names]
        macs = [seeds[s]["models"][name]["macs"] for s in names]
        ratio = "1" if name == "routed" else " ".join(f"{seeds[s]['compute']['compute_ratio']:.3f}" for s in names)
        lines.append(f"| {name} | {np.mean(macs):.4f} | {_ms(errs)} | {' '.join(f'{e:.5f}' for e in errs)} | {ratio} |")
    if all("clip" in seeds[s] for s in names):
        lines += ["", "| model | toy CLIP score (mean ± std) | per seed |", "|---|---|---|"]
        for name in ("dense", "routed", "static"):
            v = [seeds[s]["clip"][name]["clip_score"] for s in names]
            lines.append(f"| {name} | {np.mean(v):.2f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.2f} | "
                         f"{' '.join(f'{x:.2f}' for x in v)} |")
    for key in CATEGORY_KEYS:
        cats = sorted(seeds[names[0]]["by_category"][key]["routed"])
        lines += ["", f"| {key} | routed MACs | routed MSE | static MSE | routed < static in seeds |", "|---|---|---|---|---|"]
        for c in cats:
            r = [seeds[s]["by_category"][key]["routed"][c] for s in names]
            st = [seeds[s]["by_category"][key]["static"][c] for s in names]
            mc = [seeds[s]["by_category"][key]["routed_macs"][c] for s in names]
            wins = sum(a < b for a, b in zip(r, st, strict=True))
            lines.append(f"| {c} | {np.mean(mc):.3f} | {_ms(r)} | {_ms(st)} | {wins}/{len(names)} |")
    if all("oracle" in seeds[s] for s in names):
        lines += ["", "| seed | router MSE | oracle MSE | static MSE | captured | max share | hard - easy MACs |",
                  "|---|---|---|---|---|---|---|"]
        for s in names:
            o, h = seeds[s]["oracle"], seeds[s]["health"]
            cap = "-" if o.get("captured") is None else f"{o['captured']:.0%}"
            md = h["macs_by_difficulty"]
            lines.append(f"| {s} | {o['router']['to_teacher']:.5f} | {o['oracle']['to_teacher']:.5f} | "
                         f"{o['static']['to_teacher']:.5f} | {cap} | {h['max_share']:.3f} | "
                         f"{md['hard'] - md['easy']:+.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
