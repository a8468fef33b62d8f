"""The demo: the whole path on the built-in toy teacher and toy world, on CPU, in minutes.

pruning phase -> expert fine-tuning -> export (with the dense reference) -> the static baseline (one K = 1
model at the mixture's mean MACs and total fine-tuning compute, OUT/static/export) and routed vs static vs
dense on held-out prompts -> routing and generation with the torch-free runtime -> benchmarks ->
OUT/report.md. The training settings are the packaged config
training/configs/demo.yaml. Each stage's output is reused when present, so an interrupted demo continues
where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from engines import Runtime
from engines.errors import UserError
from engines.fileio import atomic_path, write_json
from training.base_model import resolve_model_path
from training.config import load_config, packaged_config
from training.export_run import export_run
from training.finetune import run_finetune
from training.prune import run_prune
from training.rundir import RunDir
from training.toy import EVAL_SEED, samples, score
from training.toy.report import make_grid

from .engines_bench import run_bench
from .evaluate import demo_quality
from .report import write_report
from .static_baseline import compare, matched_static, paired_summary

DEMO_CONFIG = "demo"  # training/configs/demo.yaml
STOPWORDS = {"a", "an", "the", "in", "of", "on", "with", "and", "at", "is", "to", "two", "three", "four", "one"}


def _stage(name: str):
    print(f"\n== {name} ==", flush=True)
    return time.perf_counter()


def top_words(captions: list[str], n: int = 5) -> list[tuple[str, int]]:
    """Most frequent content words of a caption list (as in the paper's Table 2)."""

    c = Counter(w for cap in captions for w in cap.lower().replace(",", " ").split() if w not in STOPWORDS)
    return c.most_common(n)


def run_demo(out: str | Path = "aptp-demo", overrides: list[str] | None = None, prompts: int = 256,
             per_expert: int = 6, steps: int = 25, guidance: float | None = None, repeats: int = 9,
             bench_threads: int = 1, fresh: bool = False, compare_n: int = 500) -> Path:
    """The whole path on the toy teacher (training/configs/demo.yaml + `overrides`); returns report.md's path.

    prompts: held-out prompts routed; per_expert: images generated per expert (and with the dense model);
    steps / guidance: sampler settings (guidance None = the teacher's sampling.json); repeats / bench_threads:
    latency benchmark settings; compare_n: held-out prompts of the routed-vs-static error table. Finished
    stages in `out` are reused unless `fresh`.
    """
    if prompts < 8 or per_expert < 1 or steps < 1 or repeats < 1 or compare_n < 8:
        raise UserError("--prompts and --compare-n must be >= 8 and --per-expert, --steps, --repeats >= 1")
    if bench_threads < 0:
        raise UserError("--bench-threads must be >= 0")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if fresh and out.exists():
        shutil.rmtree(out)
    run = RunDir(out / "run")
    run_dir, export_dir, bench_dir = run.root, out / "export", out / "bench"
    t_all = time.perf_counter()
    times = {}

    # 1. pruning phase -----------------------------------------------------------------------------

    t = _stage("1/7 pruning phase: router + architecture codes")
    if not run.prune_summary.is_file():
        cfg = load_config(packaged_config(DEMO_CONFIG), overrides=overrides)
        run_prune(cfg, run_dir, resume=run.has_config())
    else:
        print(f"reusing {run.prune_dir}")
    times["prune"] = time.perf_counter() - t

    # 2. fine-tuning --------------------------------------------------------------------------------

    t = _stage("2/7 materialise and fine-tune the experts")
    if not run.is_finetuned():
        run_finetune(run_dir, resume=True)
    else:
        print(f"reusing {run.experts_dir}")
    times["finetune"] = time.perf_counter() - t

    # 3. export -------------------------------------------------------------------------------------

    t = _stage("3/7 export experts, router, text encoder and the dense reference to ONNX")
    if not (export_dir / "manifest.json").is_file():
        export_run(run_dir, export_dir, with_dense=True)
    else:
        print(f"reusing {export_dir}")
    times["export"] = time.perf_counter() - t

    # 4. the fair baseline: static K = 1 at equal MACs and fine-tuning compute ------------------------
    t = _stage("4/7 static baseline: one pruned model at the mixture's MACs and fine-tuning compute")
    # the mixture's mean MACs on the very prompts of the comparison table, so the two match there (+-1 %)
    held = [s.caption for s in samples(compare_n, EVAL_SEED)]
    static = matched_static(run_dir, out / "static", held)
    cmp_path = out / "static" / "compare.json"
    if not cmp_path.is_file():
        cmp = compare(run_dir, static["run"], n=compare_n)
        cmp["paired"] = paired_summary(cmp)
        cmp.pop("per_sample"), cmp.pop("labels")
        write_json(cmp_path, cmp)
    cmp = json.loads(cmp_path.read_text())
    cmp["compute"] = static
    times["static"] = time.perf_counter() - t

    # 5-6. routing and generation with the torch-free runtime ----------------------------------------
    t = _stage("5/7 route held-out prompts; 6/7 generate images per expert (engines runtime)")
    routing = route_and_generate(export_dir, out, prompts, per_expert, steps, _guidance(guidance, run))
    cmp["images"] = static_rows(export_dir, Path(static["export"]), out, steps, _guidance(guidance, run))
    routing["static"] = cmp
    times["route_generate"] = time.perf_counter() - t

    # 6. benchmarks ----------------------------------------------------------------------------------

    t = _stage("7/7 benchmarks: latency against MACs, router cost, batching throughput")
    bench = run_bench(export_dir, bench_dir, run_dir=run_dir, prompts_per_batch=[1, 4], repeats=repeats,
                      threads=bench_threads)
    times["bench"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all

    report = write_report(out, routing, bench, times)
    print(f"\ndemo finished in {times['total'] / 60:.1f} min; report: {report}")
    return report


def _guidance(value, run: RunDir) -> float:
    """The guidance scale: given, or the base model's recommended one (sampling.json next to unet/)."""
    if value is not None:
        return float(value)
    rec = resolve_model_path(run.config().model.path) / "sampling.json"
    return float(json.loads(rec.read_text()).get("guidance_scale", 7.5)) if rec.is_file() else 7.5


def route_and_generate(export_dir, out, n_prompts: int, per_expert: int, steps: int, guidance: float = 7.5) -> dict:
    """Route held-out toy prompts; generate and score a few images per expert and with the dense model."""

    rt = Runtime.load(export_dir)
    data = samples(n_prompts, EVAL_SEED + 7)
    prompts = [s.caption for s in data]
    res = rt.route_scores(prompts)
    ids = np.asarray(res.expert_ids)
    m = rt.manifest
    frac = np.asarray([e.macs_fraction for e in m.experts])
    experts = []
    for e in m.experts:
        idx = np.flatnonzero(ids == e.id)
        experts.append({"id": e.id, "macs": e.macs, "macs_fraction": e.macs_fraction, "params": e.params,
                        "train_share": e.share, "share": len(idx) / len(prompts),
                        "top_words": top_words([prompts[i] for i in idx]),
                        "by_difficulty": {d: int(sum(data[i].difficulty == d for i in idx))
                                          for d in ("easy", "medium", "hard")}})
    by_diff = {}
    for d in ("easy", "medium", "hard"):
        sel = [i for i, s in enumerate(data) if s.difficulty == d]
        if sel:
            by_diff[d] = {"count": len(sel), "mean_macs_fraction": float(frac[ids[sel]].mean())}
    grids = out / "images"
    grids.mkdir(parents=True, exist_ok=True)
    quality = []
    routed_all, dense_all, caps_all = [], [], []
    for e in experts:
        idx = [int(i) for i in np.flatnonzero(ids == e["id"])[:per_expert]]
        if not idx:
            continue
        caps = [prompts[i] for i in idx]
        seeds = [int(i) for i in idx]
        routed = rt.generate(caps, steps=steps, guidance_scale=guidance, seed=seeds, batch_size=len(caps))
        dense = rt.generate(caps, steps=steps, guidance_scale=guidance, seed=seeds, batch_size=len(caps),
                            expert="dense")
        arr = np.stack([np.asarray(im) for im in routed])
        arr_d = np.stack([np.asarray(im) for im in dense])
        routed_all.append(arr)
        dense_all.append(arr_d)
        caps_all += caps
        s_e = [score(a, data[i].description) for a, i in zip(arr, idx, strict=True)]
        s_d = [score(a, data[i].description) for a, i in zip(arr_d, idx, strict=True)]
        psnr = [_psnr(a, b) for a, b in zip(arr, arr_d, strict=True)]
        quality.append({"id": e["id"], "n": len(idx), "colour_match": float(np.mean([s.colour for s in s_e])),
                        "dense_colour_match": float(np.mean([s.colour for s in s_d])),
                        "psnr_vs_dense_db": float(np.median(psnr))})
        grid = make_grid(np.concatenate([arr, arr_d]), [f"[e{e['id']}] {c}" for c in caps] + [f"[dense] {c}" for c in caps],
                         cols=len(idx))
        with atomic_path(grids / f"expert_{e['id']:02d}.png") as tmp:
            grid.save(tmp, format="PNG")
        e["grid"] = f"images/expert_{e['id']:02d}.png"
    toy_clip = demo_quality(np.concatenate(routed_all), np.concatenate(dense_all), caps_all) if caps_all else None
    routing = {"toy_clip": toy_clip, "prompts": len(prompts), "guidance_scale": guidance, "steps": steps, "experts": experts, "by_difficulty": by_diff, "quality": quality,
               "mean_macs_fraction": float(frac[ids].mean()), "budget": m.budget}
    write_json(out / "routing.json", routing)
    for e in experts:
        print(f"expert {e['id']}: MACs {e['macs_fraction']:.2f}, share {e['share']:.2f}, "
              f"{', '.join(w for w, _ in e['top_words'][:4])}")
    print("mean MACs fraction per difficulty: " + ", ".join(f"{d} {v['mean_macs_fraction']:.2f}" for d, v in by_diff.items()))
    return routing


def static_rows(export_dir, static_export, out, steps: int, guidance: float, per_category: int = 2) -> str:
    """One picture row each for the routed mixture, the static model and the dense teacher on the same
    held-out prompts (`per_category` per difficulty) and seeds; returns the PNG's path relative to `out`."""
    rt, st = Runtime.load(export_dir), Runtime.load(static_export)
    data = samples(400, EVAL_SEED + 11)
    picked = [s for d in ("easy", "medium", "hard") for s in [x for x in data if x.difficulty == d][:per_category]]
    caps = [s.caption for s in picked]
    seeds = list(range(len(caps)))
    kw = {"steps": steps, "guidance_scale": guidance, "seed": seeds, "batch_size": len(caps)}
    ids = rt.route(caps)
    routed = np.stack([np.asarray(im) for im in rt.generate(caps, **kw)])
    static = np.stack([np.asarray(im) for im in st.generate(caps, **kw)])
    dense = np.stack([np.asarray(im) for im in rt.generate(caps, expert="dense", **kw)])
    frac = {e.id: e.macs_fraction for e in rt.manifest.experts}
    s_frac = st.manifest.experts[0].macs_fraction
    labels = ([f"[routed e{i} {frac[i]:.2f}] {c}" for i, c in zip(ids, caps, strict=True)]
              + [f"[static {s_frac:.2f}] {c}" for c in caps] + [f"[dense] {c}" for c in caps])
    grid = make_grid(np.concatenate([routed, static, dense]), labels, cols=len(caps))
    path = Path(out) / "images" / "routed_vs_static.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return "images/routed_vs_static.png"


def _psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
