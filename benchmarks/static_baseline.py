"""The fair comparison: one static (K = 1) pruned model at the routed mixture's mean inference MACs (+-1 %)
and the same total fine-tuning compute, then routed vs static vs dense on held-out prompts.

    res = matched_static(run_dir, out_dir, captions)   # OUT/run (K = 1 run), OUT/export, OUT/compute.json
    cmp = compare(run_dir, res["run"], n=1000)          # held-out MSE to teacher / to target, per category

Fine-tuning compute (the issue's definition) = sum over experts of steps x MACs fraction x batch size, a
sample-step weighted by the student's MACs; the static model gets steps = routed compute / (its MACs
fraction x its batch). The dense teacher's forward pass in the distillation losses is the same per
sample for both and is left out. The static run is pruned with the routed run's own resolved config
(same data, losses, pruning steps), only `router.num_experts = 1` and the budget changed; its code is
then moved onto the target MACs (`match_code_macs`: width units closed or opened in the order of the
code's own logits) before fine-tuning.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from engines.errors import UserError
from engines.fileio import write_json
from training.config import config_from_dict, save_config
from training.evaluation import RunEvaluator
from training.export_run import export_run
from training.finetune import run_finetune
from training.prune import run_prune
from training.rundir import RunDir

from .diagnostics import CATEGORY_KEYS, by_category, categories, heldout, per_sample_errors


def finetune_compute(run_dir: str | Path) -> dict:
    """Fine-tuning compute of a finished run: per expert steps x MACs fraction x batch (shared weights:
    the samples its mask ran x MACs fraction), and the total."""
    run = RunDir(run_dir)
    if not run.experts_summary.is_file():
        raise UserError(f"{run.root}: not fine-tuned (no {run.experts_summary.name})")
    summary = json.loads(run.experts_summary.read_text())
    bs = run.config().finetune.batch_size
    rows = []
    for e in summary["experts"]:
        steps = int(e.get("steps") or 0)
        if "sample_steps" in e:  # shared weights: the samples each expert's mask actually ran
            rows.append({"id": e["id"], "sample_steps": int(e["sample_steps"]), "macs_fraction": e["macs_fraction"],
                         "compute": int(e["sample_steps"]) * e["macs_fraction"], "weights": "shared",
                         "shared_steps": steps})
            continue
        batch = min(bs, int(e["train_samples"])) if e["train_samples"] else 0
        rows.append({"id": e["id"], "steps": steps, "batch": batch, "macs_fraction": e["macs_fraction"],
                     "compute": steps * e["macs_fraction"] * batch})
    return {"experts": rows, "total": float(sum(r["compute"] for r in rows)),
            "definition": "sum over experts of steps x MACs fraction x batch"}


def mixture_macs(run_dir: str | Path, captions: list[str]) -> float:
    """Mean MACs fraction of the experts the run's router picks for `captions`."""
    return float(RunEvaluator(run_dir).routing(captions)["mean_macs"])


def _code_macs(run: RunDir) -> float:
    return float(json.loads(run.prune_summary.read_text())["expert_macs"][0])


def match_code_macs(run_dir: str | Path, target: float, tol: float = 0.01) -> float:
    """Move a K = 1 run's code onto `target` MACs fraction (+- tol / 2) and rewrite RUN/prune's router files;
    returns the new MACs fraction. The resource loss lands near the budget, not on it (measured on the
    toy: 0.4-8 % off after a short pruning phase): close the open width units the code is least sure of
    (smallest logit) while above, open the closed ones it is most nearly keeping while below, one unit at
    a time, never below `router.min_width_units` per group. Depth units are left as learned."""
    run = RunDir(run_dir)
    ev = RunEvaluator(run.root)
    router = ev.router
    if router.num_experts != 1:
        raise UserError(f"{run.root}: match_code_macs expects a K = 1 run, got K = {router.num_experts}")
    offset, margin = router.offset, 0.25
    width = torch.zeros(router.layout.num_units, dtype=torch.bool)
    group = torch.full((router.layout.num_units,), -1, dtype=torch.long)
    for gi, (a, b) in enumerate(router.layout.width_slices):
        width[a:b] = True
        group[a:b] = gi

    def frac() -> float:
        return float(ev.space.macs(router.expert_gates()[0], **ev.macs_kwargs)) / ev.dense_macs

    m = frac()
    with torch.no_grad():
        for _ in range(router.layout.num_units):
            if abs(m / target - 1) <= tol / 2:
                break
            logits = router.codes[0]
            on = (logits + offset > 0)
            if m > target:
                kept = torch.bincount(group[width & on], minlength=len(router.layout.width_slices))
                cand = width & on & (kept[group.clamp(min=0)] > router.min_width_units)
                if not bool(cand.any()):
                    break
                i = int(torch.where(cand, logits, torch.full_like(logits, float("inf"))).argmin())
                logits[i] = -offset - margin
            else:
                cand = width & ~on
                if not bool(cand.any()):
                    break
                i = int(torch.where(cand, logits, torch.full_like(logits, -float("inf"))).argmax())
                logits[i] = -offset + margin
            m = frac()
    meta = json.loads(run.router_meta.read_text())
    keep = {k: v for k, v in meta.items() if k not in ("format", "num_experts", "num_units", "embedding_dim",
                                                       "gumbel_tau", "gumbel_offset", "min_width_units",
                                                       "width_slices", "scores")}
    keep.update({"expert_macs_fraction": [m], "macs_matched_to": target})
    router.save(run.prune_dir, extra=keep)
    summary = json.loads(run.prune_summary.read_text())
    summary.update({"expert_macs": [m], "mean_macs": m, "macs_matched_to": target})
    write_json(run.prune_summary, summary)
    return m


def matched_static(run_dir: str | Path, out_dir: str | Path, captions: list[str], tol: float = 0.01,
                   progress: bool = True, export: bool = True) -> dict:
    """Prune, fine-tune (and export) the static K = 1 model matched to `run_dir` on MACs and compute.

    captions: the held-out prompts on which the mixture's mean MACs is measured. Writes OUT/run,
    OUT/export (a normal export directory with one expert) and OUT/compute.json; each stage is reused
    when complete. Returns compute.json's content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "compute.json"
    if record.is_file() and (not export or (out / "export" / "manifest.json").is_file()):
        return json.loads(record.read_text())
    t0 = time.perf_counter()
    routed_cfg = RunDir(run_dir).config()
    target = mixture_macs(run_dir, captions)
    routed = finetune_compute(run_dir)
    run = RunDir(out / "run")
    if not run.is_pruned():
        d = routed_cfg.to_dict()
        d["router"]["num_experts"] = 1
        d["prune"]["budget"] = round(target, 5)
        d["name"], d["runs_dir"] = "static", str(out)
        run_prune(config_from_dict(d), run.root, resume=run.has_config(), progress=progress)
    pruned = _code_macs(run)
    got = match_code_macs(run.root, target, tol)
    batch = routed_cfg.finetune.batch_size
    steps = max(1, round(routed["total"] / (got * batch)))
    if not run.is_finetuned():
        d = run.config().to_dict()
        d["finetune"]["steps"], d["finetune"]["allocation"] = steps, "per_expert"
        # one expert: shared-weight fine-tuning would train the same weights through a gated dense copy
        # (measured identical, 0.0211 vs 0.0211 held-out on the toy), only slower
        d["finetune"]["weights"] = "separate"
        save_config(config_from_dict(d), run.config_path)
        run_finetune(run.root, resume=True, progress=progress)
    if export and not (out / "export" / "manifest.json").is_file():
        export_run(run.root, out / "export")
    static = finetune_compute(run.root)["experts"][0]  # same definition for both: steps x MACs x batch
    res = {"target_macs": target, "static_macs": got, "macs_ratio": got / target, "pruned_macs": pruned,
           "routed": routed, "static": static,
           "compute_ratio": static["compute"] / routed["total"] if routed["total"] else None,
           "run": str(run.root), "export": str(out / "export") if export else None,
           "seconds": time.perf_counter() - t0}
    write_json(record, res)
    return res


@torch.no_grad()
def compare(routed_run: str | Path, static_run: str | Path, n: int = 1000, progress: bool = True) -> dict:
    """Held-out errors of the routed mixture, the static model and the dense teacher, overall and per
    category (paired: same samples, noise, timesteps). Errors: MSE to the dense teacher's output and
    denoising MSE to the true target (the dense teacher's own figure is its `to_target`)."""
    ev, sev = RunEvaluator(routed_run), RunEvaluator(static_run)
    data = heldout(n, ev.base.image_size, ev.cfg.data.toy_world)
    labels = categories(data)
    a = ev.router.route(ev.embeddings(data.captions)).cpu()
    models = {f"routed/{k}": m for k, m in ev.finetuned_experts().items()}
    models["static"] = sev.finetuned_experts()[0]
    errs = per_sample_errors(models, ev.base, data, assignment={"routed": a}, progress=progress)
    macs = ev.expert_macs().double().numpy()
    rows = {"dense": {"macs": 1.0, "to_target": float(errs["dense"]["to_target"].mean()), "to_teacher": 0.0},
            "routed": {"macs": float(macs[a.numpy()].mean())},
            "static": {"macs": float(sev.expert_macs()[0])}}
    for name in ("routed", "static"):
        rows[name]["to_target"] = float(errs[name]["to_target"].mean())
        rows[name]["to_teacher"] = float(errs[name]["to_teacher"].mean())
    per = {}
    for key in CATEGORY_KEYS:
        per[key] = {name: by_category(errs[name]["to_teacher"], labels[key]) for name in ("routed", "static")}
        per[key]["routed_macs"] = by_category(macs[a.numpy()], labels[key])
    return {"n": n, "models": rows, "by_category": per,
            "per_sample": {name: errs[name]["to_teacher"].tolist() for name in ("routed", "static")},
            "labels": labels}


def compare_markdown(cmp: dict, compute: dict | None = None) -> str:
    m = cmp["models"]
    lines = [f"Held-out prompts: {cmp['n']}; error = MSE to the dense teacher's output and denoising MSE to the "
             "true target, timesteps 200/500/800, the same noise for every model.", "",
             "| model | mean MACs | MSE to teacher | MSE to target | fine-tuning compute |", "|---|---|---|---|---|"]
    for name in ("dense", "routed", "static"):
        c = ""
        if compute is not None and name == "routed":
            c = f"{compute['routed']['total']:.0f}"
        elif compute is not None and name == "static":
            c = f"{compute['static']['compute']:.0f} ({compute['static']['steps']} steps)"
        lines.append(f"| {name} | {m[name]['macs']:.4f} | {m[name]['to_teacher']:.5f} | {m[name]['to_target']:.5f} | {c} |")
    for key in CATEGORY_KEYS:
        per = cmp["by_category"][key]
        lines += ["", f"| {key} | routed MACs | routed MSE to teacher | static MSE to teacher | routed / static |",
                  "|---|---|---|---|---|"]
        for c in sorted(per["routed"]):
            r, s = per["routed"][c], per["static"][c]
            lines.append(f"| {c} | {per['routed_macs'][c]:.3f} | {r:.5f} | {s:.5f} | {r / s:.3f} |")
    return "\n".join(lines) + "\n"


def paired_summary(cmp: dict) -> dict:
    """Share of held-out prompts on which the routed mixture is closer to the teacher than static."""
    r, s = np.asarray(cmp["per_sample"]["routed"]), np.asarray(cmp["per_sample"]["static"])
    return {"routed_better_share": float((r < s).mean()), "mean_difference": float((r - s).mean())}
