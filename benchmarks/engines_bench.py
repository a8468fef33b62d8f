"""`aptp bench`: latency against MACs for every expert of an export, router cost, batching throughput.

    from benchmarks.engines_bench import run_bench
    result = run_bench("export/toy", "bench/", run_dir="runs/toy")   # run_dir enables torch eager

Writes OUT/bench.json (all rows and summaries), OUT/bench.csv (the latency rows) and
OUT/latency_vs_macs.png. Rows carry at least expert, backend, batch (the CFG-doubled UNet batch),
macs_fraction, latency_ms_median, latency_fraction.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from aptp_export.expert_io import load_expert
from engines import Runtime
from engines.errors import UserError
from engines.fileio import write_json, write_text
from engines.manifest import read_manifest
from training.base_model import load_base_model
from training.rundir import RunDir
from training.toy import captions

from .plots import latency_vs_macs
from .timing import machine, measure
from .unet_latency import InputShape, ModelUnderTest, available_backends, bench_unets, speedups


def models_from_export(export_dir: str | Path, run_dir: str | Path | None = None) -> tuple[list, InputShape]:
    """The dense model and every expert of an export directory as models under test.

    With `run_dir` (the training run the export came from) each also gets a torch loader, so
    torch eager can be timed against onnxruntime on the very same network."""

    export_dir = Path(export_dir)
    m = read_manifest(export_dir)
    if m.dense is None:

        raise UserError(f"{export_dir}: no dense model in the export (export with --with-dense); "
                        "latency fractions need it as the reference")
    loaders = _torch_loaders(run_dir, [e.id for e in m.experts]) if run_dir else {}
    models = [ModelUnderTest("dense", m.dense.macs, 1.0, m.dense.params, export_dir / m.dense.files["onnx"].path,
                             _plan(export_dir, m.dense.files), loaders.get("dense"))]
    for e in m.experts:
        ir = e.files.get("openvino")
        extra = {"share": e.share}
        if e.quantization:
            extra.update({"guard_psnr_min": e.quantization.get("psnr_min"),
                          "guard_psnr_mean": e.quantization.get("psnr_mean")})
        models.append(ModelUnderTest(f"expert_{e.id:02d}", e.macs, e.macs_fraction, e.params,
                                     export_dir / e.files["onnx"].path, _plan(export_dir, e.files),
                                     loaders.get(e.id), extra, None if ir is None else export_dir / ir.path,
                                     e.precision))
    shape = InputShape(m.in_channels, m.sample_size[0], m.sample_size[1], m.text_len, m.text_encoder.hidden_size)
    return models, shape


def _plan(export_dir: Path, files: dict):
    ref = files.get("tensorrt")
    return export_dir / ref.path if ref is not None else None


def _torch_loaders(run_dir, expert_ids: list[int]) -> dict:
    run = RunDir(run_dir)
    cfg = run.config()

    def dense():
        return load_base_model(cfg.model).unet

    loaders = {"dense": dense}
    for k in expert_ids:
        loaders[k] = (lambda k=k: load_expert(run.expert(k)).eval())
    return loaders


def default_prompts(n: int = 16, seed: int = 12345) -> list[str]:
    """A mixed prompt set (easy, medium and hard toy captions, held-out seed)."""

    return [c for c, _ in captions(n, seed=seed)]


def bench_router(rt, prompts: list[str], repeats: int = 10) -> dict:
    """Router cost per prompt when prompts are routed in one batch, and for a single prompt."""
    batched = measure(lambda: rt.route(prompts, batch_size=len(prompts)), warmup=2, repeats=repeats)
    single = measure(lambda: rt.route(prompts[:1]), warmup=2, repeats=repeats)
    return {"prompts": len(prompts), "batched_ms_per_prompt": batched.median_ms / len(prompts),
            "batched_ms_total": batched.median_ms, "single_prompt_ms": single.median_ms}


def bench_throughput(rt, prompts: list[str], steps: int = 10, guidance_scale: float = 7.5,
                     batch_size: int = 16, rounds: int = 2) -> dict:
    """Images per second for a mixed prompt set: routed and batched per expert against one prompt at a time.

    Both runs produce the same images (seed i for prompt i), so only the batching differs."""
    seeds = list(range(len(prompts)))

    def batched():
        return rt.generate(prompts, steps=steps, guidance_scale=guidance_scale, seed=seeds, batch_size=batch_size)

    def one_by_one():
        return [rt.generate([p], steps=steps, guidance_scale=guidance_scale, seed=[s]) for p, s in zip(prompts, seeds, strict=True)]

    t_b = measure(batched, warmup=1, repeats=rounds)
    t_1 = measure(one_by_one, warmup=0, repeats=rounds)
    ids = rt.route(prompts)
    return {"prompts": len(prompts), "steps": steps, "batch_size": batch_size,
            "experts_used": len(set(ids)), "batched_s": t_b.median_ms / 1e3, "one_at_a_time_s": t_1.median_ms / 1e3,
            "batched_images_per_s": len(prompts) / (t_b.median_ms / 1e3),
            "one_at_a_time_images_per_s": len(prompts) / (t_1.median_ms / 1e3),
            "speedup": t_1.median_ms / t_b.median_ms}


def rows_to_csv(rows: list[dict]) -> str:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def run_bench(export_dir: str | Path, out_dir: str | Path, run_dir: str | Path | None = None,
              backends: list[str] | None = None, prompts_per_batch: list[int] = (1, 2, 4, 8),
              repeats: int = 10, warmup: int = 2, throughput_steps: int = 10, prompts: list[str] | None = None,
              progress: bool = True, threads: int = 0) -> dict:
    """Measure everything `aptp bench` reports and write it under `out_dir`."""

    out_dir = Path(out_dir)
    models, shape = models_from_export(export_dir, run_dir)
    have = available_backends(models)
    backends = list(backends) if backends else have
    missing = [b for b in backends if b not in have]
    if missing:
        why = {"torch": "pass --run (the training run) to time torch eager",
               "tensorrt": "export with --backend tensorrt on a GPU machine",
               "onnxruntime-cuda": "onnxruntime cannot run on CUDA here (see `aptp doctor`)",
               "onnxruntime": "the export lacks ONNX graphs",
               "openvino-int8": "quantize the export first (aptp quantize) and install openvino"}
        raise UserError("; ".join(f"backend {b} is not available: {why.get(b, 'unknown backend')}" for b in missing))
    say = print if progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    say(f"bench: {len(models)} models x {backends} x prompts/batch {list(prompts_per_batch)}")
    rows = bench_unets(models, shape, list(prompts_per_batch), backends, warmup=warmup, repeats=repeats,
                       threads=threads, progress=lambda b, p: say(f"  {b}: {p} prompt(s) per batch done"))
    rt = Runtime.load(export_dir, provider="cpu")
    prompts = prompts or default_prompts(16)
    router = bench_router(rt, prompts)
    say(f"  router: {router['batched_ms_per_prompt']:.2f} ms per prompt (batched)")
    thr = bench_throughput(rt, prompts, steps=throughput_steps)
    say(f"  throughput: batched {thr['batched_images_per_s']:.2f} img/s vs one at a time "
        f"{thr['one_at_a_time_images_per_s']:.2f} img/s ({thr['speedup']:.2f}x)")
    unet_ms = {r["expert"]: r["latency_ms_median"] for r in rows if r["backend"] == "onnxruntime" and r["prompts"] == 1}
    machine = {**_machine(), "bench_threads": threads}
    if threads:  # _machine() sees torch's restored default; the timings ran with `threads`
        machine["torch_threads"] = threads
    result = {
        "export_dir": str(export_dir), "machine": machine, "seconds": time.perf_counter() - t0,
        "shape": shape.__dict__, "rows": rows, "torch_vs_onnxruntime": speedups(rows),
        "int8_vs_fp32": precision_table(rows),
        "router": {**router, "fraction_of_25_step_generation_dense":
                   router["batched_ms_per_prompt"] / (25 * unet_ms["dense"]) if "dense" in unet_ms else None},
        "throughput": thr,
    }
    write_json(out_dir / "bench.json", result)
    write_text(out_dir / "bench.csv", rows_to_csv(rows))
    latency_vs_macs([r for r in rows if r["prompts"] == 1], out_dir / "latency_vs_macs.png",
                    title="Latency against MACs (1 prompt, CFG batch 2)")
    say("  batch 2 (one prompt with CFG), median ms and fraction of the dense model's, per backend:")
    for r in sorted((r for r in rows if r["prompts"] == 1), key=lambda r: (r["backend"], r["expert"])):
        say(f"    {r['backend']:16s} {r['expert']:10s} MACs {r['macs_fraction']:.3f}  {r['latency_ms_median']:8.2f} ms"
            f"  latency {r['latency_fraction']:.3f}")
    for r in result["int8_vs_fp32"]:
        if r["batch"] == 2:
            say(f"  {r['expert']} {r['precision']}: {r['int8_ms']:.1f} ms vs fp32 {r['fp32_ms']:.1f} ms "
                f"({r['int8_speedup']:.2f}x); over dense fp32 {r['int8_over_dense_fp32']:.2f} (MACs {r['macs_fraction']:.2f})")
    say(f"bench: wrote {out_dir / 'bench.json'} in {result['seconds']:.0f} s")
    return result


def precision_table(rows: list[dict]) -> list[dict]:
    """Per (expert, batch) with an int8 IR: fp32 onnxruntime and int8 OpenVINO medians, the int8 speed-up,
    and the product "MACs fraction x int8 time over own fp32" (= int8 time over the dense fp32 time if
    latency followed MACs), beside the measured int8 time over the dense fp32 graph."""
    idx = {(r["expert"], r["batch"], r["backend"]): r for r in rows}
    out = []
    for (name, batch, backend), r in idx.items():
        f = idx.get((name, batch, "onnxruntime"))
        if backend != "openvino-int8" or r.get("precision", "fp32") == "fp32" or f is None:
            continue
        speed = f["latency_ms_median"] / r["latency_ms_median"]
        out.append({"expert": name, "batch": batch, "precision": r["precision"], "macs_fraction": r["macs_fraction"],
                    "fp32_ms": f["latency_ms_median"], "int8_ms": r["latency_ms_median"], "int8_speedup": speed,
                    "macs_fraction_over_speedup": r["macs_fraction"] / speed,
                    "int8_over_dense_fp32": r["latency_fraction"],
                    "guard_psnr_min": r.get("guard_psnr_min"), "guard_psnr_mean": r.get("guard_psnr_mean")})
    return sorted(out, key=lambda x: (x["batch"], x["expert"]))


def _machine() -> dict:
    info = {**machine(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    return info
