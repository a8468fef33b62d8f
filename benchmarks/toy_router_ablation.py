"""The router's acceptance figures on the toy teacher and toy world (CPU, tens of minutes).

    python -m benchmarks.toy_router_ablation --out runs/ablation [--model DIR] [--steps 240] [--ft-steps 240]

Runs (each a normal `aptp prune` run directory under --out, reused when already complete):
  ot_b50     K=8, budget 0.50, optimal transport            -> shares, MACs levels, easy vs hard
  noot_b50   K=8, budget 0.50, nearest code (OT disabled)   -> shares (the ablation)
  ot_b75     K=8, budget 0.75, optimal transport            -> mean MACs vs budget
  k1         K=1 (the paper's Uni-Arch), budget = ot_b50's held-out mean MACs
Then ot_b50's experts and k1's single expert are fine-tuned on the same training set, `--ft-steps` steps
for every expert (`--ft-allocation per_expert`, the paper's protocol) or `--ft-steps` in total shared by
routed samples (`split`), and compared on held-out samples: mean squared error of the routed expert's
output to the dense teacher's (fixed noise, timesteps 200/500/800). `--ft-runs k1_total` fine-tunes a copy
of k1 for K x --ft-steps steps (the mixture's total under per_expert).
Held-out prompts: the first --heldout samples of the toy world's evaluation seed (captions never seen in
training). Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from engines.fileio import write_json
from training import toy
from training.config import config_from_dict, load_config, resolve_config_arg, save_config
from training.data import ToyDataset
from training.evaluation import RunEvaluator, distill_error
from training.finetune import run_finetune
from training.prune import run_prune
from training.router import Router
from training.rundir import RunDir

TIMESTEPS = (200, 500, 800)  # held-out distillation error: every sample at these timesteps, fixed noise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--model", default=None, help="base model dir (default: the shipped toy teacher)")
    p.add_argument("--config", default="toy", help="base config (file or packaged name)")
    p.add_argument("--steps", type=int, default=None, help="pruning steps (default: the config's)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: the config's)")
    p.add_argument("--ft-steps", type=int, default=100, help="fine-tuning steps (per expert or in total, see below)")
    p.add_argument("--ft-allocation", choices=("per_expert", "split"), default="per_expert",
                   help="per_expert: --ft-steps for every expert (the paper); split: --ft-steps in total")
    p.add_argument("--heldout", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--only", default=None, help="comma-separated subset of runs: ot_b50,noot_b50,ot_b75,k1,ft")
    p.add_argument("--set", action="append", default=[], help="extra config override for every run")
    p.add_argument("--ft-runs", default="ot_b50,k1", help="runs to fine-tune and compare (stage ft)")
    return p.parse_args(argv)


def _prune(name, out: Path, base_cfg, overrides, args) -> Path:
    run = out / name
    if RunDir(run).is_pruned():
        print(f"[{name}] reusing {run}")
        return run
    ov = list(args.set) + list(overrides) + [f"name={name}", f"runs_dir={out}"]
    if args.model:
        ov.append(f"model.path={args.model}")
    if args.steps:
        ov.append(f"prune.steps={args.steps}")
    if args.warmup is not None:
        ov.append(f"prune.warmup_steps={args.warmup}")
    cfg = load_config(base_cfg, overrides=ov)
    t0 = time.time()
    resume = RunDir(run).latest_checkpoint.is_file()
    run_prune(cfg, run, resume=resume)
    print(f"[{name}] pruned in {time.time() - t0:.0f} s")
    return run


def _routing(run: Path, captions, difficulty):
    ev = RunEvaluator(run)
    r = ev.routing(captions, difficulty)
    r.pop("assignment")
    return ev, r


def main(argv=None) -> int:
    args = parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = resolve_config_arg(args.config)
    only = set(args.only.split(",")) if args.only else {"ot_b50", "noot_b50", "ot_b75", "k1", "ft"}
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    held = ToyDataset(args.heldout, seed=toy.EVAL_SEED)
    caps, diff = held.captions, held.difficulty
    results["heldout"] = {"n": len(caps), "seed": toy.EVAL_SEED,
                          "difficulty_counts": {d: diff.count(d) for d in sorted(set(diff))}}

    mine: set[str] = {"heldout"}

    def save():
        # several instances (--only subsets) may run at once: merge into the file, keep others' keys

        current = json.loads(results_path.read_text()) if results_path.is_file() else {}
        current.update({k: results[k] for k in mine})
        results.update({k: v for k, v in current.items() if k not in mine})
        write_json(results_path, current)

    for name, ov in (("ot_b50", ["prune.budget=0.5"]), ("noot_b50", ["prune.budget=0.5", "router.optimal_transport=false"]),
                     ("ot_b75", ["prune.budget=0.75"])):
        if name not in only:
            continue
        run = _prune(name, out, base_cfg, ov, args)
        _, r = _routing(run, caps, diff)
        r["budget"] = float(ov[0].split("=")[1])
        r["distinct_macs_levels"] = len({round(m, 3) for m in r["expert_macs"]})
        results[name] = r
        mine.add(name)
        save()
        print(f"[{name}] shares {[round(s, 3) for s in r['shares']]} max {r['max_share']:.3f} "
              f"mean MACs {r['mean_macs']:.4f} (budget {r['budget']}) levels {r['distinct_macs_levels']} "
              f"easy {r['groups']['easy']['mean_macs']:.3f} hard {r['groups']['hard']['mean_macs']:.3f}")

    if "k1" in only:
        if "ot_b50" not in results and results_path.is_file():
            results.update(json.loads(results_path.read_text()))
        target = results.get("ot_b50", {}).get("mean_macs", 0.5)
        run = _prune("k1", out, base_cfg, ["router.num_experts=1", f"prune.budget={target:.4f}"], args)
        _, r = _routing(run, caps, diff)
        r["budget"] = round(target, 4)
        results["k1"] = r
        mine.add("k1")
        save()
        print(f"[k1] MACs {r['mean_macs']:.4f} (budget {target:.4f})")

    if "ft" in only:


        if results_path.is_file():
            comp = json.loads(results_path.read_text()).get("finetune", {})
        else:
            comp = {}
        for name in args.ft_runs.split(","):
            run = out / name
            steps = args.ft_steps
            if name == "k1_total":


                if not RunDir(out / "k1").is_pruned() or not RunDir(out / "ot_b50").is_pruned():
                    raise SystemExit("k1_total needs the pruned runs k1 and ot_b50 under --out (run them first)")
                if args.ft_allocation == "per_expert":  # the mixture's total: K x steps; under split it is `steps`
                    steps = args.ft_steps * Router.load(RunDir(out / "ot_b50").prune_dir).num_experts
                if not run.is_dir():
                    shutil.copytree(out / "k1", run, ignore=shutil.ignore_patterns(RunDir(run).experts_dir.name))
            ev = RunEvaluator(run)
            a = ev.router.route(ev.embeddings(caps))
            before = distill_error(ev.materialized_experts(), a, ev.base.unet, ev.base, held, TIMESTEPS, progress=True)
            if not RunDir(run).is_finetuned():
                _set_finetune(run, steps, args.ft_allocation)
                t0 = time.time()
                run_finetune(run, resume=True)
                print(f"[{name}] fine-tuned in {time.time() - t0:.0f} s")
            else:
                print(f"[{name}] reusing fine-tuned experts")
            after = distill_error(ev.finetuned_experts(), a, ev.base.unet, ev.base, held, TIMESTEPS, progress=True)
            macs = ev.expert_macs()
            used = RunDir(run).config().finetune  # what the experts were trained with
            comp[name] = {"mean_macs": float(macs[a].double().mean()), "mse_before_finetune": before["mse"],
                          "mse_after_finetune": after["mse"], "per_timestep_after": after["per_timestep"],
                          "finetune_steps": used.steps, "allocation": used.allocation, "lr": used.lr}
            print(f"[{name}] held-out distillation MSE {before['mse']:.5f} -> {after['mse']:.5f} "
                  f"at mean MACs {comp[name]['mean_macs']:.4f}")
        results["finetune"] = comp
        mine.add("finetune")
        save()
    save()
    _write_markdown(out, json.loads(results_path.read_text()))
    print(f"results: {results_path}")
    return 0


def _set_finetune(run: Path, steps: int, allocation: str) -> None:
    """Fine-tuning steps of a run: `steps` per expert (per_expert) or shared by routed samples (split)."""

    rd = RunDir(run)
    d = rd.config().to_dict()
    d["finetune"]["steps"] = steps
    d["finetune"]["allocation"] = allocation
    save_config(config_from_dict(d), rd.config_path)


def _write_markdown(out: Path, res: dict) -> None:
    lines = ["# Toy router ablation", "", f"Held-out prompts: {res['heldout']['n']} "
             f"({res['heldout']['difficulty_counts']})", ""]
    lines += ["| run | budget | mean MACs | max share | shares | experts' MACs | easy | medium | hard |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in ("ot_b50", "noot_b50", "ot_b75", "k1"):
        if name not in res:
            continue
        r = res[name]
        g = r.get("groups", {})
        lines.append(f"| {name} | {r['budget']} | {r['mean_macs']:.4f} | {r['max_share']:.3f} | "
                     f"{' '.join(f'{s:.2f}' for s in r['shares'])} | {' '.join(f'{m:.3f}' for m in r['expert_macs'])} | "
                     + " | ".join(f"{g[d]['mean_macs']:.3f}" if d in g else "-" for d in ("easy", "medium", "hard")) + " |")
    if "finetune" in res:
        lines += ["", "| method | mean MACs | fine-tuning steps | held-out MSE to teacher, before fine-tuning | after |",
                  "|---|---|---|---|---|"]
        for name, r in res["finetune"].items():
            steps = f"{r.get('finetune_steps', r.get('finetune_steps_total'))} ({r.get('allocation', 'split')})"
            lines.append(f"| {name} | {r['mean_macs']:.4f} | {steps} | {r['mse_before_finetune']:.5f} | "
                         f"{r['mse_after_finetune']:.5f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
