"""Does the world contain the effect APTP exploits, and does the router use it? Three diagnostics.

    python -m benchmarks.diagnostics probe  --out runs/diag/probe [--fractions 0.3,0.4,0.5,0.7] [-n 1000]
    python -m benchmarks.diagnostics oracle --run RUN [--static RUN_K1] --out runs/diag/oracle [-n 1000]
    python -m benchmarks.diagnostics health --run RUN --out runs/diag/health [-n 1000]
    (also: aptp eval --diagnose probe,oracle,health --run RUN [--static-run RUN_K1])

- capacity-need probe: static (K = 1) sub-networks of the teacher at several MACs fractions, each pruned
  with the run config's pruning phase and fine-tuned, and the held-out error of each prompt category
  (difficulty and caption template) as MACs fall. Error = denoising MSE to the true target (v or eps) at
  fixed timesteps and noise, so the dense teacher has an error too and "increase over dense" is
  pruned - dense; the MSE to the teacher's own output is reported beside it. If every category degrades
  alike, no router can beat one static model: there is nothing to route on.
- oracle bound: every held-out prompt through every expert of a run; per prompt the expert minimising
  error + lambda x MACs, lambda set so the mean MACs equal the router's. Router vs oracle vs a static
  model: how much of the oracle's gain over static the router captures.
- router health: per prompt the score margin (top-1 minus top-2 score) and the entropy of
  softmax(scores / epsilon) with the run's Sinkhorn epsilon; shares per category and expert.

Every figure is paired: the same held-out samples, noise and timesteps for every model. Writes JSON,
markdown and a PNG per diagnostic into --out.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engines.fileio import write_json, write_text
from training import toy
from training.config import load_config, resolve_config_arg
from training.data import ToyDataset, collate
from training.evaluation import RunEvaluator
from training.finetune import run_finetune
from training.losses import diffusion_target
from training.prune import run_prune
from training.rundir import RunDir

from .plots import save_figure
from .timing import machine

TIMESTEPS = (200, 500, 800)
CATEGORY_KEYS = ("difficulty", "template")


# ------------------------------------------------------------------------------------------ held-out errors

def heldout(n: int, size: int = 32, world: str = "v1") -> ToyDataset:
    """The first `n` held-out toy samples (captions never seen in training) of `world`, at `size` px."""
    return ToyDataset(n, seed=toy.EVAL_SEED, size=size, world=world)


def categories(dataset) -> dict[str, list[str]]:
    """Category labels per sample: difficulty and caption template (toy data)."""
    return {"difficulty": list(dataset.difficulty),
            "template": [d["template"] for d in dataset.descriptions]}


@torch.no_grad()
def per_sample_errors(models: dict[str, torch.nn.Module], base, dataset, timesteps=TIMESTEPS, seed: int = 0,
                      batch_size: int = 50, assignment: dict[str, torch.Tensor] | None = None,
                      progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Per-sample held-out errors of every model, paired (same samples, noise, timesteps).

    models: name -> UNet-like module (called as unet(x, t, **cond).sample); a name may instead be routed:
    `assignment[name]` int64 [N] picks, per sample, the model `f"{name}/{k}"` (each expert must be in
    `models` under that key). Returns name -> {"to_target": [N], "to_teacher": [N]} (float64 means over
    `timesteps` of the per-sample MSE to the true diffusion target and to the dense teacher's output),
    and "dense" -> the teacher's own "to_target".
    """
    assignment = assignment or {}
    n = len(dataset)
    gen = torch.Generator().manual_seed(seed)
    c, h, w = base.latent_shape()
    plain = [k for k in models if "/" not in k]
    names = plain + list(assignment)
    out = {k: {"to_target": np.zeros(n), "to_teacher": np.zeros(n)} for k in names}
    out["dense"] = {"to_target": np.zeros(n), "to_teacher": np.zeros(n)}
    for start in tqdm(range(0, n, batch_size), desc="held-out errors", disable=not progress):
        idx = torch.arange(start, min(n, start + batch_size))
        pixels, captions, sizes = collate(dataset, idx, sizes=True)
        eps = torch.randn((len(idx), base.latent_channels, h, w), generator=gen) if base.vae is not None else None
        x0 = base.encode_images(pixels, eps)
        cond = base.conditioning(captions, sizes)
        for tv in timesteps:
            noise = torch.randn((len(idx), c, h, w), generator=gen)
            t = torch.full((len(idx),), int(tv), dtype=torch.long)
            noisy = base.scheduler.add_noise(x0, noise, t)
            target = diffusion_target(base.scheduler, x0, noise, t, base.prediction_type)
            ref = cond.predict(base.unet, noisy, t)
            out["dense"]["to_target"][idx.numpy()] += _mse(ref, target, len(timesteps))
            for name in plain:
                y = cond.predict(models[name], noisy, t)
                out[name]["to_target"][idx.numpy()] += _mse(y, target, len(timesteps))
                out[name]["to_teacher"][idx.numpy()] += _mse(y, ref, len(timesteps))
            for name, a_all in assignment.items():
                a = a_all[idx]
                for k in a.unique().tolist():
                    m = a == k
                    y = cond[m].predict(models[f"{name}/{k}"], noisy[m], t[m])
                    rows = idx[m].numpy()
                    out[name]["to_target"][rows] += _mse(y, target[m], len(timesteps))
                    out[name]["to_teacher"][rows] += _mse(y, ref[m], len(timesteps))
    return out


def _mse(a: torch.Tensor, b: torch.Tensor, parts: int) -> np.ndarray:
    """Per-sample MSE [B] as float64, divided by `parts` (the number of timesteps averaged)."""
    return ((a - b) ** 2).flatten(1).mean(1).double().numpy() / parts


def by_category(values: np.ndarray, labels: list[str]) -> dict[str, float]:
    lab = np.asarray(labels)
    return {c: float(values[lab == c].mean()) for c in sorted(set(labels))}


# ------------------------------------------------------------------------------------------ capacity probe

def static_run(out: Path, name: str, config: str | Path, fraction: float, overrides: list[str] = (),
               finetune_steps: int | None = None, progress: bool = True) -> Path:
    """A K = 1 run at MACs budget `fraction`: pruned with `config`'s pruning phase, then fine-tuned
    (`finetune_steps` steps, default the config's). Reused when complete, resumed when interrupted."""
    run = RunDir(out / name)
    if not run.is_pruned():
        ov = [*overrides, "router.num_experts=1", f"prune.budget={fraction:.4f}", f"name={name}", f"runs_dir={out}"]
        if finetune_steps is not None:
            ov.append(f"finetune.steps={int(finetune_steps)}")
        cfg = load_config(resolve_config_arg(str(config)), overrides=ov)
        run_prune(cfg, run.root, resume=run.has_config(), progress=progress)
    if not run.is_finetuned():
        run_finetune(run.root, resume=True, progress=progress)
    return run.root


def capacity_probe(out: str | Path, fractions=(0.3, 0.4, 0.5, 0.7), n: int = 1000, config: str = "demo",
                   overrides: list[str] = (), finetune_steps: int | None = None, progress: bool = True) -> dict:
    """Static sub-networks at `fractions` of dense MACs; held-out error per category as MACs fall."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = {f: static_run(out, f"static_{round(f * 100):03d}", config, f, overrides, finetune_steps, progress)
            for f in fractions}
    evs = {f: RunEvaluator(r) for f, r in runs.items()}
    base = next(iter(evs.values())).base
    data = heldout(n, base.image_size, next(iter(evs.values())).cfg.data.toy_world)
    labels = categories(data)
    models = {f"static_{f:.2f}": evs[f].finetuned_experts()[0] for f in fractions}
    macs = {f"static_{f:.2f}": float(evs[f].expert_macs()[0]) for f in fractions}
    errs = per_sample_errors(models, base, data, progress=progress)
    dense = errs["dense"]["to_target"]
    rows = []
    for name, e in errs.items():
        if name == "dense":
            continue
        rec = {"model": name, "macs": macs[name], "to_target": float(e["to_target"].mean()),
               "to_teacher": float(e["to_teacher"].mean()), "increase": float((e["to_target"] - dense).mean())}
        for key in CATEGORY_KEYS:
            rec[f"increase_by_{key}"] = by_category(e["to_target"] - dense, labels[key])
            rec[f"to_teacher_by_{key}"] = by_category(e["to_teacher"], labels[key])
        rows.append(rec)
    result = {"diagnostic": "capacity_probe", "n": n, "timesteps": list(TIMESTEPS), "config": str(config),
              "overrides": list(overrides), "dense_to_target": float(dense.mean()),
              "dense_by_difficulty": by_category(dense, labels["difficulty"]),
              "dense_by_template": by_category(dense, labels["template"]), "rows": rows,
              "seconds": time.perf_counter() - t0, "machine": machine()}
    result["contrast"] = {key: _contrast(rows, key) for key in CATEGORY_KEYS}
    names = sorted(macs, key=macs.get)
    e = np.stack([errs[m]["to_teacher"] for m in names], axis=1)
    result["allocation"] = allocation_bound(e, np.array([macs[m] for m in names]), labels["template"])
    write_json(out / "probe.json", result)
    write_text(out / "probe.md", probe_markdown(result))
    plot_probe(result, out / "probe.png")
    return result


def allocation_bound(err: np.ndarray, macs: np.ndarray, labels: list[str]) -> list[dict]:
    """What routing could gain if its experts were as good as static networks: for each probed static network
    (budget = its MACs), the best per-category choice among all probed static networks, mean MACs <= budget,
    against that one network. err [N, F] (MSE to the teacher of prompt n through static network f, the
    dense teacher appended with MACs 1 and error 0), macs [F], labels [N] (the caption template).

    "category": each template's prompts all take one network (the choice minimises the category's mean
    error + lambda x MACs; at lambda's breakpoint a category may split, so the figure is the Lagrangian
    bound of category routing); "prompt": each prompt its own best network (an oracle: it also exploits
    per-prompt noise, so it overstates what any router can get)."""
    err = np.concatenate([err, np.zeros((len(err), 1))], axis=1)
    macs = np.concatenate([macs, [1.0]])
    lab = np.asarray(labels)
    cat_err = np.empty_like(err)
    for c in set(labels):
        cat_err[lab == c] = err[lab == c].mean(0)
    rows = np.arange(len(err))
    out = []
    for f in range(len(macs) - 1):
        rec = {"static_macs": float(macs[f]), "static": float(err[:, f].mean())}
        for name, e in (("category", cat_err), ("prompt", err)):
            choice, _ = oracle_choice(e, macs, float(macs[f]))
            got = float(err[rows, choice].mean())
            rec[name] = {"macs": float(macs[choice].mean()), "to_teacher": got,
                         "gain": 1 - got / rec["static"] if rec["static"] > 0 else 0.0}
            if name == "category":
                rec[name]["macs_by_template"] = {c: float(macs[choice[lab == c]].mean()) for c in sorted(set(labels))}
        out.append(rec)
    return out


def _contrast(rows: list[dict], key: str) -> list[dict]:
    """Per model: hardest / easiest category by error increase (to the target) and by MSE to the teacher."""
    res = []
    for r in rows:
        inc, tt = r[f"increase_by_{key}"], r[f"to_teacher_by_{key}"]
        lo, hi = min(inc, key=inc.get), max(inc, key=inc.get)
        tlo, thi = min(tt, key=tt.get), max(tt, key=tt.get)
        res.append({"model": r["model"], "macs": r["macs"], "easiest": lo, "hardest": hi,
                    "ratio": inc[hi] / inc[lo] if inc[lo] > 0 else math.inf,
                    "teacher_easiest": tlo, "teacher_hardest": thi,
                    "teacher_ratio": tt[thi] / tt[tlo] if tt[tlo] > 0 else math.inf})
    return res


def probe_markdown(res: dict) -> str:
    lines = ["# Capacity-need probe", "",
             f"Static (K = 1) sub-networks, {res['n']} held-out prompts, timesteps {res['timesteps']}. "
             "Increase = denoising MSE to the true target minus the dense teacher's; "
             "to teacher = MSE to the dense teacher's output.", ""]
    for key in CATEGORY_KEYS:
        cats = sorted(res["rows"][0][f"increase_by_{key}"])
        lines += [f"## By {key}: increase over dense (MSE to teacher)", "",
                  "| model | MACs | " + " | ".join(cats) + " | hardest / easiest |",
                  "|---|---|" + "---|" * (len(cats) + 1)]
        contrast = {c["model"]: c for c in res["contrast"][key]}
        dense = res[f"dense_by_{key}"]
        lines.append("| dense (its own error) | 1.000 | " + " | ".join(f"{dense[c]:.4f}" for c in cats) + " | |")
        for r in sorted(res["rows"], key=lambda r: r["macs"]):
            c = contrast[r["model"]]
            lines.append(f"| {r['model']} | {r['macs']:.3f} | " + " | ".join(
                f"{r[f'increase_by_{key}'][x]:.4f} ({r[f'to_teacher_by_{key}'][x]:.4f})" for x in cats)
                + f" | {c['ratio']:.2f} ({c['hardest']} / {c['easiest']}); to teacher {c['teacher_ratio']:.2f} |")
        lines.append("")
    if res.get("allocation"):
        lines += ["## What routing could gain over static (experts as good as the static networks)", "",
                  "Per static network: the best choice among all probed static networks (and the dense teacher) "
                  "per caption template, and per prompt (an oracle that also exploits noise), at mean MACs <= "
                  "the network's.", "",
                  "| static MACs | static MSE | per template: MSE (MACs) | gain | per prompt: MSE (MACs) | gain |",
                  "|---|---|---|---|---|---|"]
        for a in res["allocation"]:
            c, p = a["category"], a["prompt"]
            lines.append(f"| {a['static_macs']:.3f} | {a['static']:.5f} | {c['to_teacher']:.5f} ({c['macs']:.3f}) | "
                         f"{c['gain']:+.1%} | {p['to_teacher']:.5f} ({p['macs']:.3f}) | {p['gain']:+.1%} |")
        lines.append("")
    return "\n".join(lines)


def plot_probe(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = sorted(res["rows"], key=lambda r: r["macs"])
    x = [r["macs"] for r in rows] + [1.0]
    for ax, key in zip(axes, CATEGORY_KEYS, strict=True):
        for cat in sorted(rows[0][f"to_teacher_by_{key}"]):
            y = [r[f"to_teacher_by_{key}"][cat] for r in rows] + [0.0]
            ax.plot(x, y, marker="o", label=cat)
        ax.set_xlabel("MACs fraction of the static sub-network")
        ax.set_ylabel("held-out MSE to the dense teacher")
        ax.set_title(f"by {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Capacity-need probe: do categories degrade differently as MACs fall?")
    save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ oracle bound

def oracle_choice(err: np.ndarray, macs: np.ndarray, budget: float, iters: int = 60) -> tuple[np.ndarray, float]:
    """Per row the expert minimising err[n, k] + lam * macs[k], lam >= 0 the smallest with mean MACs <=
    `budget` (bisection). err [N, K], macs [K]. Returns (choice int [N], lam)."""
    def pick(lam):
        return np.argmin(err + lam * macs[None, :], axis=1)

    c = pick(0.0)
    if macs[c].mean() <= budget + 1e-12:
        return c, 0.0
    lo, hi = 0.0, 1.0
    while macs[pick(hi)].mean() > budget + 1e-12:
        hi *= 2
        if hi > 1e9:
            break
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if macs[pick(mid)].mean() > budget + 1e-12:
            lo = mid
        else:
            hi = mid
    return pick(hi), hi


def oracle_bound(run: str | Path, out: str | Path, static: str | Path | None = None, n: int = 1000,
                 progress: bool = True) -> dict:
    """Every held-out prompt through every (fine-tuned) expert of `run`: router vs oracle vs static."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ev = RunEvaluator(run)
    data = heldout(n, ev.base.image_size, ev.cfg.data.toy_world)
    labels = categories(data)
    experts = ev.finetuned_experts()
    k = len(experts)
    routed = ev.router.route(ev.embeddings(data.captions)).cpu()
    models = {f"expert_{j}": m for j, m in experts.items()}
    static_macs = None
    if static is not None:
        sev = RunEvaluator(static)
        models["static"] = sev.finetuned_experts()[0]
        static_macs = float(sev.expert_macs()[0])
    errs = per_sample_errors(models, ev.base, data, progress=progress)
    macs = ev.expert_macs().double().numpy()
    e_teacher = np.stack([errs[f"expert_{j}"]["to_teacher"] for j in range(k)], axis=1)
    e_target = np.stack([errs[f"expert_{j}"]["to_target"] for j in range(k)], axis=1)
    a = routed.numpy()
    rows_n = np.arange(len(a))
    router_macs = float(macs[a].mean())
    choice, lam = oracle_choice(e_teacher, macs, router_macs)
    free = e_teacher.argmin(1)
    res = {"diagnostic": "oracle_bound", "run": str(run), "n": n, "k": k, "expert_macs": macs.tolist(),
           "router": {"macs": router_macs, "to_teacher": float(e_teacher[rows_n, a].mean()),
                      "to_target": float(e_target[rows_n, a].mean()),
                      "shares": np.bincount(a, minlength=k).astype(float).__truediv__(len(a)).tolist()},
           "oracle": {"macs": float(macs[choice].mean()), "lambda": lam,
                      "to_teacher": float(e_teacher[rows_n, choice].mean()),
                      "to_target": float(e_target[rows_n, choice].mean()),
                      "shares": (np.bincount(choice, minlength=k) / len(a)).tolist(),
                      "agreement_with_router": float((choice == a).mean())},
           "oracle_unconstrained": {"macs": float(macs[free].mean()), "to_teacher": float(e_teacher[rows_n, free].mean())},
           "dense_to_target": float(errs["dense"]["to_target"].mean()), "machine": machine()}
    for key in CATEGORY_KEYS:
        res[f"router_by_{key}"] = by_category(e_teacher[rows_n, a], labels[key])
        res[f"oracle_by_{key}"] = by_category(e_teacher[rows_n, choice], labels[key])
        res[f"oracle_macs_by_{key}"] = by_category(macs[choice], labels[key])
        res[f"router_macs_by_{key}"] = by_category(macs[a], labels[key])
    if static is not None:
        s = errs["static"]
        res["static"] = {"macs": static_macs, "to_teacher": float(s["to_teacher"].mean()),
                         "to_target": float(s["to_target"].mean())}
        for key in CATEGORY_KEYS:
            res[f"static_by_{key}"] = by_category(s["to_teacher"], labels[key])
        gap = res["static"]["to_teacher"] - res["oracle"]["to_teacher"]
        res["captured"] = (res["static"]["to_teacher"] - res["router"]["to_teacher"]) / gap if gap > 0 else None
    # the oracle's error-vs-MACs frontier for the plot
    frontier = []
    for lam_i in np.concatenate([[0.0], np.geomspace(1e-5, 10, 40)]):
        ch = np.argmin(e_teacher + lam_i * macs[None, :], axis=1)
        frontier.append((float(macs[ch].mean()), float(e_teacher[rows_n, ch].mean())))
    res["frontier"] = frontier
    res["seconds"] = time.perf_counter() - t0
    write_json(out / "oracle.json", res)
    write_text(out / "oracle.md", oracle_markdown(res))
    plot_oracle(res, out / "oracle.png")
    return res


def oracle_markdown(res: dict) -> str:
    lines = ["# Oracle bound", "", f"{res['n']} held-out prompts, {res['k']} experts of `{res['run']}`; "
             "error = MSE to the dense teacher's output (timesteps 200/500/800, fixed noise).", "",
             "| model | mean MACs | MSE to teacher | MSE to target |", "|---|---|---|---|"]
    for name in ("static", "router", "oracle"):
        if name in res:
            r = res[name]
            lines.append(f"| {name} | {r['macs']:.4f} | {r['to_teacher']:.5f} | {r['to_target']:.5f} |")
    u = res["oracle_unconstrained"]
    lines.append(f"| oracle, no MACs limit | {u['macs']:.4f} | {u['to_teacher']:.5f} | |")
    if res.get("captured") is not None:
        lines += ["", f"The router captures **{res['captured']:.0%}** of the oracle's gain over static "
                  "((static - router) / (static - oracle), MSE to teacher)."]
    lines += ["", f"Oracle agrees with the router on {res['oracle']['agreement_with_router']:.0%} of prompts.", ""]
    cats = sorted(res["router_by_difficulty"])
    lines += ["| difficulty | router MACs | oracle MACs | router MSE | oracle MSE |" + (" static MSE |" if "static" in res else ""),
              "|---|---|---|---|---|" + ("---|" if "static" in res else "")]
    for c in cats:
        lines.append(f"| {c} | {res['router_macs_by_difficulty'][c]:.3f} | {res['oracle_macs_by_difficulty'][c]:.3f} | "
                     f"{res['router_by_difficulty'][c]:.5f} | {res['oracle_by_difficulty'][c]:.5f} |"
                     + (f" {res['static_by_difficulty'][c]:.5f} |" if "static" in res else ""))
    return "\n".join(lines) + "\n"


def plot_oracle(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    fx, fy = zip(*sorted(res["frontier"]), strict=True)
    ax.plot(fx, fy, color="0.6", label="oracle over these experts")
    for j, m in enumerate(res["expert_macs"]):
        ax.axvline(m, color="0.9", lw=0.8, zorder=0)
    for name, marker in (("router", "o"), ("oracle", "*"), ("static", "s")):
        if name in res:
            ax.scatter([res[name]["macs"]], [res[name]["to_teacher"]], marker=marker, s=80, label=name, zorder=3)
    ax.set_xlabel("mean MACs fraction")
    ax.set_ylabel("held-out MSE to the dense teacher")
    ax.set_title("Oracle bound: best expert per prompt")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ router health

def router_health(run: str | Path, out: str | Path, n: int = 1000) -> dict:
    """Score margin and entropy per prompt; shares per category and expert; MACs per category."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ev = RunEvaluator(run)
    data = heldout(n, ev.base.image_size, ev.cfg.data.toy_world)
    labels = categories(data)
    scores = ev.router.inference_scores(ev.embeddings(data.captions)).double().cpu().numpy()
    k = scores.shape[1]
    eps = float(ev.cfg.router.sinkhorn_epsilon)
    top = np.sort(scores, axis=1)
    margin = top[:, -1] - top[:, -2] if k > 1 else np.full(len(scores), np.inf)
    p = np.exp((scores - scores.max(1, keepdims=True)) / eps)
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(np.clip(p, 1e-300, None))).sum(1) / (math.log(k) if k > 1 else 1.0)
    a = scores.argmax(1)
    macs = ev.expert_macs().double().numpy()
    res = {"diagnostic": "router_health", "run": str(run), "n": n, "k": k, "epsilon": eps,
           "expert_macs": macs.tolist(), "shares": (np.bincount(a, minlength=k) / len(a)).tolist(),
           "max_share": float(np.bincount(a, minlength=k).max() / len(a)),
           "margin_median": float(np.median(margin)), "margin_p10": float(np.percentile(margin, 10)),
           "entropy_median": float(np.median(entropy)), "score_spread_median": float(np.median(top[:, -1] - top[:, 0])),
           "machine": machine()}
    for key in CATEGORY_KEYS:
        lab = np.asarray(labels[key])
        res[f"by_{key}"] = {c: {"count": int((lab == c).sum()), "mean_macs": float(macs[a[lab == c]].mean()),
                                "margin_median": float(np.median(margin[lab == c])),
                                "entropy_median": float(np.median(entropy[lab == c])),
                                "shares": (np.bincount(a[lab == c], minlength=k) / (lab == c).sum()).tolist()}
                            for c in sorted(set(labels[key]))}
    write_json(out / "health.json", res)
    write_text(out / "health.md", health_markdown(res))
    plot_health(res, out / "health.png", margin, labels["difficulty"])
    return res


def health_markdown(res: dict) -> str:
    k = res["k"]
    lines = ["# Router health", "", f"{res['n']} held-out prompts; scores = the router's inference scores; entropy of "
             f"softmax(scores / {res['epsilon']}) normalised by log K.", "",
             f"Median margin {res['margin_median']:.4f} (10th percentile {res['margin_p10']:.4f}); median entropy "
             f"{res['entropy_median']:.3f}; median spread of the K scores {res['score_spread_median']:.4f}; "
             f"max share {res['max_share']:.3f} (2/K = {2 / k:.3f}).", "",
             "| expert | MACs | share |", "|---|---|---|"]
    for j in range(k):
        lines.append(f"| {j} | {res['expert_macs'][j]:.3f} | {res['shares'][j]:.3f} |")
    for key in CATEGORY_KEYS:
        lines += ["", f"| {key} | n | mean MACs | margin | entropy | shares per expert |", "|---|---|---|---|---|---|"]
        for c, r in res[f"by_{key}"].items():
            lines.append(f"| {c} | {r['count']} | {r['mean_macs']:.3f} | {r['margin_median']:.4f} | "
                         f"{r['entropy_median']:.3f} | {' '.join(f'{s:.2f}' for s in r['shares'])} |")
    return "\n".join(lines) + "\n"


def plot_health(res: dict, path: Path, margin: np.ndarray, difficulty: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lab = np.asarray(difficulty)
    for c in sorted(set(difficulty)):
        axes[0].hist(margin[lab == c], bins=30, alpha=0.5, label=c)
    axes[0].set_xlabel("score margin (top-1 - top-2)")
    axes[0].set_title("Router confidence per difficulty")
    axes[0].legend()
    cats = list(res["by_template"])
    mat = np.array([res["by_template"][c]["shares"] for c in cats])
    im = axes[1].imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axes[1].set_yticks(range(len(cats)), cats, fontsize=8)
    axes[1].set_xticks(range(res["k"]), [f"{j}\n{m:.2f}" for j, m in enumerate(res["expert_macs"])], fontsize=7)
    axes[1].set_xlabel("expert (MACs fraction)")
    axes[1].set_title("share of each template per expert")
    fig.colorbar(im, ax=axes[1])
    save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("probe", "oracle", "health"))
    p.add_argument("--out", required=True)
    p.add_argument("-n", type=int, default=1000, help="held-out prompts")
    p.add_argument("--run", help="a finished run (oracle, health)")
    p.add_argument("--static", help="a finished K = 1 run to compare (oracle)")
    p.add_argument("--fractions", default="0.3,0.4,0.5,0.7", help="probe: MACs fractions")
    p.add_argument("--config", default="demo", help="probe: the config whose phases make the static networks")
    p.add_argument("--ft-steps", type=int, default=None, help="probe: fine-tuning steps (default: the config's)")
    p.add_argument("--set", action="append", default=[], help="probe: config override KEY=VALUE")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "probe":
        res = capacity_probe(args.out, [float(f) for f in args.fractions.split(",")], args.n, args.config,
                             args.set, args.ft_steps)
        print(probe_markdown(res))
    elif args.what == "oracle":
        if not args.run:
            raise SystemExit("oracle needs --run")
        res = oracle_bound(args.run, args.out, args.static, args.n)
        print(oracle_markdown(res))
    else:
        if not args.run:
            raise SystemExit("health needs --run")
        res = router_health(args.run, args.out, args.n)
        print(health_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
