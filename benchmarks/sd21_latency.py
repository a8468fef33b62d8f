"""Latency against MACs at real scale: the Stable Diffusion 2.1 UNet architecture (random weights).

    python -m benchmarks.sd21_latency [--sizes 32 64] [--keep 0.9 0.78 0.66 0.5] [--only keep_0.50 ...]
                                      [--round-to 4 16] [--sets all|per-keep] [--backends onnxruntime torch]
                                      [--paired-speedup] [--profile] [--repeats 5] [--out DIR] [--onnx-dir DIR]

For each latent size: random architecture vectors at the given keep ratios (ArchSpace.sample, seed
`--seed`, drawn in order; `--only` then keeps some of them), each materialised from the dense UNet,
exported to ONNX (verified against torch) and timed side by side with the dense UNet, onnxruntime CPU
against torch eager, UNet batch 2 (one prompt with CFG), 77 tokens.

- `--sets per-keep` times every expert in its own interleaved set with the dense model (memory: at
  64x64 the activations of five sessions do not fit in 14 GB).
- `--round-to N [M ...]` adds, next to every expert `keep_X`, the experts `keep_X_rN` whose kept channels
  are rounded up to multiples of N (aptp_export.rounding); each expert and its rounded variants are
  timed in their own interleaved set with the dense model.
- `--paired-speedup` times every model on onnxruntime and torch in alternating rounds (the speed-up
  without the drift of a busy machine between the backend phases); `--backends` with no value skips
  the per-backend phases.
- `--profile` adds an onnxruntime per-operator profile of every model (benchmarks.ort_profile).

Phases keep the peak memory to one backend's set of models: export (the dense torch UNet plus one
expert at a time), onnxruntime (sessions only; the torch UNet is freed), torch eager (the dense UNet is
rebuilt from the seed, experts materialised from it). ONNX graphs are cached under OUT/onnx/SIZE/ (or
--onnx-dir) with a name that carries a hash of the vector and the seed, so a rerun with other settings
never reuses a stale graph.

Writes OUT/sd21_bench.json, OUT/sd21_bench.csv, OUT/sd21_latency_vs_macs_<size>.png and
OUT/sd21_table_<size>.md, and prints the tables. Time on the 2-core machine: about 25 min for
--sizes 32 (export included), about two hours for 64.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from aptp_export import ArchSpace
from aptp_export.export_spec import unet_spec
from aptp_export.onnx_export import UNetGraph, export_onnx
from aptp_export.rounding import round_units, rounding_summary
from aptp_export.unet_configs import SD21_UNET_CONFIG
from engines.fileio import write_json, write_text

from .engines_bench import rows_to_csv
from .materialize_sd21 import peak_rss_gb, random_sd21, rss_gb
from .ort_profile import compare_profiles, profile_graph
from .plots import latency_vs_macs, markdown_table
from .timing import interleaved, machine
from .unet_latency import (
    InputShape,
    ModelUnderTest,
    ort_callable,
    recorded_calls,
    torch_callable,
    bench_unets,
    speedups,
    unet_feeds,
)

LAT_TOLERANCE = 1.05  # acceptance: latency fraction <= 1.05 x MACs fraction (experts with MACs fraction <= 0.9)
MIN_SPEEDUP = 2.0     # acceptance: onnxruntime >= 2x torch eager


def arch_tag(arch, seed: int) -> str:
    bits = np.packbits(arch.numpy() > 0.5).tobytes()
    return hashlib.sha1(bits + f"seed={seed}".encode()).hexdigest()[:10]


def onnx_param_count(path: Path) -> int:
    """Parameter count of a saved graph from its initialisers' shapes (external data not read)."""

    m = onnx.load(str(path), load_external_data=False)
    return int(sum(math.prod(t.dims) for t in m.graph.initializer))


def _rss_gb() -> float:
    return rss_gb()


# summary key -> row key; a model timed in several sets (the dense one) gets the mean over its sets
_AVERAGED = (("ms", "latency_ms_median"), ("latency_fraction", "latency_fraction"),
             ("latency_fraction_paired", "latency_fraction_paired"), ("latency_fraction_min", "latency_fraction_min"),
             ("cpu_fraction", "cpu_fraction"))


def summary_rows(rows: list[dict], pairs: list[dict] | None = None) -> list[dict]:
    """One row per model: MACs fraction, both backends' medians and fractions, speed-up, acceptance flags.

    With several interleaved sets the dense model appears once per set; its medians are averaged."""
    by = {}
    for r in rows:
        d = by.setdefault(r["expert"], {"model": r["expert"], "macs_fraction": r["macs_fraction"],
                                        "gmacs": r["macs"] / 1e9, "params_m": r["params"] / 1e6})
        b = r["backend"]
        for key, src in _AVERAGED:
            if src in r:
                d.setdefault(f"_{b}_{key}", []).append(r[src])
    out = []
    for d in by.values():
        for b in ("onnxruntime", "torch"):
            for key, _ in _AVERAGED:
                vals = d.pop(f"_{b}_{key}", None)
                if vals:
                    d[f"{b}_{key}"] = sum(vals) / len(vals)
        if "onnxruntime_ms" in d:
            d["latency_over_macs"] = d["onnxruntime_latency_fraction"] / d["macs_fraction"]
            if d["model"] != "dense" and d["macs_fraction"] <= 0.9:
                d["latency_ok"] = d["latency_over_macs"] <= LAT_TOLERANCE
        if "onnxruntime_ms" in d and "torch_ms" in d:
            d["speedup"] = d["torch_ms"] / d["onnxruntime_ms"]
        pair = next((p for p in pairs or [] if p["expert"] == d["model"]), None)
        if pair is not None:
            d["speedup_paired"] = pair["speedup_paired"]
            d["speedup_min"] = pair["speedup_min"]
        if "speedup_paired" in d or "speedup" in d:
            d["speedup_ok"] = d.get("speedup_paired", d.get("speedup")) >= MIN_SPEEDUP
        out.append(d)
    return out


ROBUSTNESS_COLUMNS = [("model", "model", ""), ("macs_fraction", "MACs fraction", ".3f"),
                      ("onnxruntime_latency_fraction", "ORT ratio of medians", ".3f"),
                      ("onnxruntime_latency_fraction_paired", "ORT median of paired ratios", ".3f"),
                      ("onnxruntime_latency_fraction_min", "ORT ratio of minima", ".3f"),
                      ("onnxruntime_cpu_fraction", "ORT CPU-time ratio", ".3f"),
                      ("torch_latency_fraction_paired", "torch median of paired ratios", ".3f"),
                      ("speedup_paired", "ORT speed-up, same rounds", ".2f"),
                      ("speedup_min", "ORT speed-up, minima", ".2f")]
TABLE_COLUMNS = [("model", "model", ""), ("macs_fraction", "MACs fraction", ".3f"), ("gmacs", "GMACs", ".1f"),
                 ("onnxruntime_ms", "ORT ms", ".0f"), ("onnxruntime_latency_fraction", "ORT latency fraction", ".3f"),
                 ("latency_over_macs", "latency / MACs", ".3f"), ("torch_ms", "torch ms", ".0f"),
                 ("torch_latency_fraction", "torch latency fraction", ".3f"), ("speedup", "ORT speed-up", ".2f")]


def _parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sides (32 = 256 px)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.78, 0.66, 0.5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="time only these experts (e.g. keep_0.50)")
    ap.add_argument("--backends", nargs="*", default=["onnxruntime", "torch"], choices=["onnxruntime", "torch"])
    ap.add_argument("--round-to", type=int, nargs="+", default=[],
                    help="also time every expert with its kept channels rounded up to multiples of N")
    ap.add_argument("--sets", choices=("all", "per-keep"), default="all",
                    help="time all models in one interleaved set, or each expert in its own set with the dense "
                         "model (less memory: needed at 64x64; implied by --round-to)")
    ap.add_argument("--profile", action="store_true", help="onnxruntime per-operator profile of every model")
    ap.add_argument("--paired-speedup", action="store_true",
                    help="also time every model on onnxruntime and torch in alternating rounds (the speed-up)")
    ap.add_argument("--out", default="bench/sd21", help="output directory (ONNX graphs go to OUT/onnx)")
    ap.add_argument("--onnx-dir", help="ONNX graph cache (default OUT/onnx; shareable between runs)")
    args = ap.parse_args(argv)
    if any(n < 2 for n in args.round_to):
        ap.error("--round-to values must be >= 2")

    return ap, args


def _experts(ap, args, space) -> tuple[dict, list[list[str]], dict]:
    """(name -> architecture, timing sets of model names, rounding summaries) from the command line."""
    g = torch.Generator().manual_seed(args.seed)
    archs = {f"keep_{k:.2f}": space.sample(generator=g, keep=k) for k in args.keep}
    if args.only:
        unknown = sorted(set(args.only) - set(archs))
        if unknown:
            ap.error(f"--only: no expert named {', '.join(unknown)} (have {', '.join(archs)})")
        archs = {n: a for n, a in archs.items() if n in args.only}
    sets = [["dense", *archs]] if args.sets == "all" else [["dense", n] for n in archs]
    rounding = {}
    if args.round_to:
        sets = []
        for name in list(archs):
            sets.append(["dense", name])
            for n in args.round_to:
                rname = f"{name}_r{n}"
                archs[rname] = round_units(space, archs[name], n)
                rounding[rname] = rounding_summary(space, archs[name], archs[rname], n)
                sets[-1].append(rname)
    return archs, sets, rounding


def _export_models(args, space, archs: dict, size: int, onnx_dir: Path, info: dict) -> dict[str, ModelUnderTest]:
    """The dense UNet and every expert as ONNX graphs at `size` (cached in onnx_dir), one at a time."""
    dense_macs = space.dense_macs(size, size, 77)
    spec = unet_spec(4, (size, size), 77, 1024, batch=(2, 2, 2))
    models: dict[str, ModelUnderTest] = {}
    dense = None
    for name, arch in [("dense", None), *archs.items()]:
        tag = f"seed{args.seed}" if arch is None else arch_tag(arch, args.seed)
        path = onnx_dir / f"{size}" / f"{name}-{tag}.onnx"
        macs = dense_macs if arch is None else space.macs(arch.tolist(), size, size, 77)
        if not path.exists():
            if dense is None:
                dense = random_sd21(args.seed)
            model = dense if arch is None else space.materialize(dense, arch)
            params = sum(p.numel() for p in model.parameters())
            t = time.perf_counter()
            res = export_onnx(UNetGraph(model), spec, path)
            err = max(res.max_rel_error.values())
            info["exports"][name] = {"seconds": res.seconds, "max_rel_error": err}
            print(f"[{size}] exported {name} in {time.perf_counter() - t:.0f} s (max rel err vs torch "
                  f"{err:.1e}), RSS {_rss_gb():.1f} GB", flush=True)
            del model
        else:
            params = onnx_param_count(path)
        models[name] = ModelUnderTest(name, macs, macs / dense_macs, params, onnx=path, extra={"latent": size})
        gc.collect()
    del dense
    gc.collect()
    return models


def _time_sets(args, models: dict, sets: list[list[str]], shape: InputShape, backend: str, info: dict) -> list[dict]:
    """Every timing set on one backend, interleaved within a set."""
    rows = []
    for i, names in enumerate(sets):
        rs = bench_unets([models[n] for n in names], shape, [1], [backend], warmup=args.warmup, repeats=args.repeats)
        info.setdefault("rss_gb", {})[f"{backend}_set{i}"] = _rss_gb()
        rows += [{**r, "set": i} for r in rs]
        gc.collect()
    return rows


def _profiles(models: dict, shape: InputShape, size: int, out: Path, info: dict) -> None:
    """onnxruntime per-operator profiles of every model (written to OUT/sd21_profile_SIZE.json)."""
    feeds = unet_feeds(shape, 1)
    profiles = {}
    for name, m in models.items():
        profiles[name] = profile_graph(m.onnx, feeds, runs=2)
        profiles[name]["nodes"] = profiles[name]["nodes"][:60]
        gc.collect()
    info["profiles"] = profiles
    info["profile_by_op"] = compare_profiles(profiles)
    write_json(out / f"sd21_profile_{size}.json", {"profiles": profiles, "by_op": info["profile_by_op"]})
    print(f"[{size}] profiles written", flush=True)


def _time_torch(args, space, archs: dict, models: dict, sets, shape: InputShape, info: dict) -> list[dict]:
    """torch eager: the dense UNet rebuilt from the seed, experts materialised from it."""
    dense = random_sd21(args.seed)
    for name, m in models.items():
        m.load_torch = ((lambda d=dense: d) if name == "dense"
                        else (lambda a=archs[name], d=dense: space.materialize(d, a)))
    rows = _time_sets(args, models, sets, shape, "torch", info)
    for m in models.values():
        m.load_torch = None
    del dense
    gc.collect()
    return rows


def _paired_speedups(args, space, archs: dict, models: dict, shape: InputShape, size: int) -> list[dict]:
    """The same model on both backends in alternating rounds: the speed-up without the drift of a busy
    machine between the two backend phases."""
    feeds = unet_feeds(shape, 1)
    dense = random_sd21(args.seed)
    pairs = []
    for name, m in models.items():
        module = dense if name == "dense" else space.materialize(dense, archs[name])
        calls = {"onnxruntime": [], "torch": []}
        raw = {"onnxruntime": ort_callable(m.onnx, feeds), "torch": torch_callable(module, feeds)}
        fns = {k: recorded_calls(f, calls[k]) for k, f in raw.items()}
        t = interleaved(fns, warmup=args.warmup, repeats=args.repeats, settle=1, untimed=raw)
        w = {k: np.array([x for x, _ in v]) for k, v in calls.items()}
        pairs.append({"expert": name, "onnxruntime_ms": t["onnxruntime"].median_ms,
                      "torch_ms": t["torch"].median_ms,
                      "speedup_paired": float(np.median(w["torch"] / w["onnxruntime"])),
                      "speedup_min": float(w["torch"].min() / w["onnxruntime"].min()),
                      "repeats": args.repeats})
        print(f"[{size}] {name}: torch / onnxruntime in the same rounds x{pairs[-1]['speedup_paired']:.2f}",
              flush=True)
        del fns, raw, module
        gc.collect()
    del dense
    gc.collect()
    return pairs


def _report_size(rows: list[dict], pairs: list[dict], size: int, dense_macs: float, out: Path, info: dict) -> None:
    summary = summary_rows(rows, pairs)
    info.update(rows=rows, summary=summary, speedups=speedups(rows))
    latency_vs_macs(rows, out / f"sd21_latency_vs_macs_{size}.png",
                    title=f"SD 2.1 UNet architecture, {size}x{size} latent, batch 2")
    table = markdown_table(summary, TABLE_COLUMNS)
    robust = markdown_table(summary, ROBUSTNESS_COLUMNS)
    write_text(out / f"sd21_table_{size}.md", table + "\n\nLatency fraction, other estimators:\n\n" + robust + "\n")
    print(f"\n[{size}x{size} latent, UNet batch 2, dense {dense_macs / 1e9:.1f} GMACs per sample]\n{table}\n\n"
          f"{robust}\n", flush=True)
    for d in summary:
        if "latency_ok" in d:
            print(f"  {d['model']}: ORT latency/MACs {d['latency_over_macs']:.3f} "
                  f"({'ok' if d['latency_ok'] else 'OVER'} <= {LAT_TOLERANCE})", flush=True)


def main(argv=None) -> int:
    ap, args = _parse_args(argv)
    out = Path(args.out)
    onnx_dir = Path(args.onnx_dir) if args.onnx_dir else out / "onnx"
    t0 = time.perf_counter()
    space = ArchSpace.from_config(SD21_UNET_CONFIG)
    archs, sets, rounding = _experts(ap, args, space)
    result = {"config": vars(args), "machine": machine(), "threads": torch.get_num_threads(), "rounding": rounding,
              "loadavg_start": os.getloadavg(), "sizes": {}}
    all_rows = []
    for size in args.sizes:
        dense_macs = space.dense_macs(size, size, 77)
        info = {"dense_gmacs": dense_macs / 1e9, "exports": {}}
        models = _export_models(args, space, archs, size, onnx_dir, info)
        shape = InputShape(4, size, size, 77, 1024)
        rows = []
        if "onnxruntime" in args.backends:
            rows += _time_sets(args, models, sets, shape, "onnxruntime", info)
            print(f"[{size}] onnxruntime done ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
        if args.profile:
            _profiles(models, shape, size, out, info)
        if "torch" in args.backends:
            rows += _time_torch(args, space, archs, models, sets, shape, info)
            print(f"[{size}] torch done ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
        pairs = _paired_speedups(args, space, archs, models, shape, size) if args.paired_speedup else []
        if pairs:
            info["paired_speedups"] = pairs
        all_rows += rows
        _report_size(rows, pairs, size, dense_macs, out, info)
        result["sizes"][size] = info
        write_json(out / "sd21_bench.json", {**result, "partial": True})  # a later size may not finish
    result["loadavg_end"] = os.getloadavg()
    result["peak_rss_gb"] = peak_rss_gb()
    result["seconds"] = time.perf_counter() - t0
    write_json(out / "sd21_bench.json", result)
    write_text(out / "sd21_bench.csv", rows_to_csv(all_rows))
    print(f"wrote {out / 'sd21_bench.json'} ({result['seconds'] / 60:.1f} min, peak RSS {result['peak_rss_gb']:.1f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
