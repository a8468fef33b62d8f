"""Pruned x quantized at real scale: the Stable Diffusion 2.1 UNet architecture (random weights), fp32
onnxruntime against int8 OpenVINO (NNCF post-training quantization), per expert, side by side.

    python -m benchmarks.sd21_int8 [--size 32] [--keep 0.9 0.7 0.5] [--calib 16] [--repeats 5]
                                   [--threads 2] [--out bench/sd21_int8] [--phase all|prepare|time]

For one latent size (32 = 256 px): the dense UNet and experts at the given keep ratios (ArchSpace.sample,
seed `--seed`, drawn in order as benchmarks.sd21_latency draws them), exported to ONNX (cached in
OUT/onnx) and quantized with NNCF (int8 weights and activations, ModelType.TRANSFORMER, as `aptp
quantize` does before its guard) on `--calib` UNet calls of batch 2 whose inputs are drawn like a sampler's
(Gaussian latents scaled to the timestep's noise level, timesteps spread over 1..999, a CFG pair of text
states: with random weights there are no prompts to route). Saved as OpenVINO IR in OUT/int8.

Timing (`--phase time`): every model on both backends in interleaved rounds (benchmarks.timing.interleaved),
UNet batch 2 (one prompt with CFG), 77 tokens, `--threads` intra-op threads on both. Fidelity: UNet-output
PSNR of int8 against fp32 onnxruntime on 4 fixed inputs not used for calibration (peak = the fp32 output's
range). Acceptance (issue 23): every expert's int8 >= 2.0x its own fp32, the keep-0.5 int8 >= 3.0x the dense
fp32, PSNR >= 35 dB.

Writes OUT/sd21_int8.json and OUT/sd21_int8.md (and prints the table). Peak memory is one model's export
or quantization at a time.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from aptp_export import ArchSpace
from aptp_export.export_spec import unet_spec
from aptp_export.onnx_export import UNetGraph, export_onnx
from aptp_export.unet_configs import SD21_UNET_CONFIG
from engines.fileio import write_json, write_text

from .materialize_sd21 import peak_rss_gb, random_sd21, rss_gb
from .plots import markdown_table
from .timing import interleaved, machine
from .unet_latency import openvino_callable, ort_callable

MIN_OWN_SPEEDUP = 2.0
MIN_DENSE_SPEEDUP = 3.0  # the keep-0.5 int8 expert against the dense fp32 graph
MIN_PSNR = 35.0


def sampler_like_inputs(n: int, size: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`n` UNet inputs of batch 2 (a CFG pair) shaped like a 25-step DDIM trajectory's: x_t = sqrt(a) x0 +
    sqrt(1-a) eps with x0 ~ N(0, 0.8^2) (the spread of SD latents x 0.18215), timesteps spread over 1..999."""
    rng = np.random.default_rng(seed)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alphas = np.cumprod(1 - betas)
    out = []
    for i in range(n):
        t = int(round(999 - i * 998 / max(1, n - 1)))
        x0 = 0.8 * rng.standard_normal((1, 4, size, size))
        eps = rng.standard_normal((1, 4, size, size))
        x = np.sqrt(alphas[t]) * x0 + np.sqrt(1 - alphas[t]) * eps
        text = rng.standard_normal((2, 77, 1024)).astype(np.float32)
        out.append({"sample": np.repeat(x, 2, axis=0).astype(np.float32), "timestep": np.full(2, t, np.float32),
                    "encoder_hidden_states": text})
    return out


def _export(space, archs: dict, size: int, onnx_dir: Path, seed: int) -> dict[str, dict]:
    spec = unet_spec(4, (size, size), 77, 1024, batch=(2, 2, 2))
    dense_macs = space.dense_macs(size, size, 77)
    models, dense = {}, None
    for name, arch in [("dense", None), *archs.items()]:
        path = onnx_dir / f"{name}-seed{seed}-{size}.onnx"
        macs = dense_macs if arch is None else space.macs(arch.tolist(), size, size, 77)
        if not path.exists():
            if dense is None:
                dense = random_sd21(seed)
            model = dense if arch is None else space.materialize(dense, arch)
            t = time.perf_counter()
            res = export_onnx(UNetGraph(model), spec, path)
            print(f"exported {name} in {time.perf_counter() - t:.0f} s (max rel err {max(res.max_rel_error.values()):.1e}),"
                  f" RSS {rss_gb():.1f} GB", flush=True)
            del model
            gc.collect()
        models[name] = {"onnx": path, "macs": macs, "macs_fraction": macs / dense_macs}
    del dense
    gc.collect()
    return models


def _quantize(models: dict, int8_dir: Path, calib: list[dict]) -> dict:
    import logging

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    info = {}
    for name, m in models.items():
        xml = int8_dir / f"{m['onnx'].stem}.int8.xml"
        m["ir"] = xml
        if xml.exists():
            continue
        t = time.perf_counter()
        q = nncf.quantize(ov.Core().read_model(str(m["onnx"])), nncf.Dataset(calib), subset_size=len(calib),
                          model_type=nncf.ModelType.TRANSFORMER)
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(q, str(xml), compress_to_fp16=False)
        info[name] = {"seconds": time.perf_counter() - t, "rss_gb": rss_gb()}
        print(f"quantized {name} in {info[name]['seconds']:.0f} s, RSS {rss_gb():.1f} GB", flush=True)
        del q
        gc.collect()
    return info


def _psnr(ref: np.ndarray, got: np.ndarray) -> float:
    mse = float(np.mean((ref.astype(np.float64) - got) ** 2))
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def _time(models: dict, size: int, threads: int, repeats: int, warmup: int) -> list[dict]:
    feeds = sampler_like_inputs(1, size, seed=999)[0]
    feeds["timestep"][:] = 500.0
    fns = {}
    for name, m in models.items():
        fns[f"{name}/fp32"] = ort_callable(m["onnx"], feeds, threads=threads)
        fns[f"{name}/int8"] = openvino_callable(m["ir"], feeds, threads=threads)
    timings = interleaved(fns, warmup=warmup, repeats=repeats)
    dense = timings["dense/fp32"].median_ms
    rows = []
    for name, m in models.items():
        f, q = timings[f"{name}/fp32"], timings[f"{name}/int8"]
        rows.append({"model": name, "macs_fraction": m["macs_fraction"], "fp32_ms": f.median_ms, "int8_ms": q.median_ms,
                     "int8_speedup": f.median_ms / q.median_ms, "int8_over_dense_fp32": q.median_ms / dense,
                     "fp32_over_dense_fp32": f.median_ms / dense, "fp32_p90_ms": f.as_dict().get("latency_ms_p90"),
                     "int8_p90_ms": q.as_dict().get("latency_ms_p90")})
    return rows


def _fidelity(models: dict, size: int, threads: int) -> dict[str, float]:
    from engines.backends.openvino import OvSession
    from engines.backends.ort import OrtSession

    inputs = sampler_like_inputs(4, size, seed=4242)
    out = {}
    for name, m in models.items():
        a, b = OrtSession(m["onnx"], threads=threads), OvSession(m["ir"], threads=threads)
        out[name] = min(_psnr(a.run(x)["out_sample"], b.run(x)["out_sample"]) for x in inputs)
        del a, b
        gc.collect()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", type=int, default=16, help="calibration UNet calls (batch 2 each)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phase", choices=("all", "prepare", "time"), default="all")
    ap.add_argument("--out", default="bench/sd21_int8")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    space = ArchSpace.from_config(SD21_UNET_CONFIG)
    g = torch.Generator().manual_seed(args.seed)
    archs = {f"keep_{k:.2f}": space.sample(generator=g, keep=k) for k in args.keep}
    models = _export(space, archs, args.size, out / "onnx", args.seed)
    qinfo = _quantize(models, out / "int8", sampler_like_inputs(args.calib, args.size, seed=args.seed))
    if args.phase == "prepare":
        print(f"prepared {len(models)} models in {(time.perf_counter() - t0) / 60:.1f} min")
        return 0
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    rows = _time(models, args.size, args.threads, args.repeats, args.warmup)
    psnr = _fidelity(models, args.size, args.threads)
    for r in rows:
        r["psnr_db"] = psnr[r["model"]]
    experts = [r for r in rows if r["model"] != "dense"]
    k05 = next((r for r in rows if r["model"] == "keep_0.50"), None)
    verdict = {"every_expert_int8_over_own_fp32": min(r["int8_speedup"] for r in experts) if experts else None,
               "keep_0.50_int8_over_dense_fp32": 1 / k05["int8_over_dense_fp32"] if k05 else None,
               "min_psnr_db": min(psnr.values())}
    verdict["passed"] = bool(experts and verdict["every_expert_int8_over_own_fp32"] >= MIN_OWN_SPEEDUP
                             and (k05 is None or verdict["keep_0.50_int8_over_dense_fp32"] >= MIN_DENSE_SPEEDUP)
                             and verdict["min_psnr_db"] >= MIN_PSNR)
    result = {"config": vars(args), "machine": machine(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "quantize": qinfo, "rows": rows, "verdict": verdict, "peak_rss_gb": peak_rss_gb(),
              "seconds": time.perf_counter() - t0}
    write_json(out / "sd21_int8.json", result)
    table = markdown_table(rows, [("model", "model", "s"), ("macs_fraction", "MACs", ".3f"),
                                  ("fp32_ms", "fp32 ORT ms", ".0f"), ("int8_ms", "int8 OV ms", ".0f"),
                                  ("int8_speedup", "int8 / own fp32", ".2f"),
                                  ("fp32_over_dense_fp32", "fp32 / dense fp32", ".3f"),
                                  ("int8_over_dense_fp32", "int8 / dense fp32", ".3f"), ("psnr_db", "PSNR dB", ".1f")])
    cpu = result["machine"]["cpu"]
    md = (f"# SD 2.1 UNet at {8 * args.size} px, fp32 onnxruntime vs int8 OpenVINO\n\nUNet batch 2, "
          f"{args.threads} threads, {args.repeats} interleaved rounds; CPU {cpu.get('model')} "
          f"({', '.join(cpu.get('isa', []))}); load {load0[0]:.2f} at start\n\n"
          f"{table}\n\nverdict: {verdict}\n")
    write_text(out / "sd21_int8.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
