"""Latency against MACs at real scale: the Stable Diffusion 2.1 UNet architecture (random weights).

    python -m benchmarks.sd21_latency [--sizes 32 64] [--keep 0.9 0.78 0.66 0.5] [--repeats 3] [--out DIR]

For each latent size: random architecture vectors at the given keep ratios (ArchSpace.sample), each
materialised, exported to ONNX (verified against torch) and timed side by side with the dense UNet,
onnxruntime CPU against torch eager, UNet batch 2 (one prompt with CFG), 77 tokens. Writes
DIR/sd21_bench.json, DIR/sd21_bench.csv and DIR/sd21_latency_vs_macs_<size>.png, and prints a table.
Takes about an hour on 2 cores (dominated by the 64x64 torch runs); --sizes 32 alone is ~15 min.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sides (32 = 256 px)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.78, 0.66, 0.5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    ap.add_argument("--round-to", type=int, default=1,
                    help="round kept units of every group up to a multiple of this many (1 = off)")
    ap.add_argument("--out", default="bench/sd21", help="output directory (ONNX graphs go to OUT/onnx)")
    args = ap.parse_args(argv)

    import torch

    from aptp_export import ArchSpace
    from aptp_export.export_spec import unet_spec
    from aptp_export.fileio import write_json, write_text
    from aptp_export.onnx_export import UNetGraph, export_onnx

    from .engines_bench import rows_to_csv
    from .materialize_sd21 import peak_rss_gb, random_sd21
    from .plots import latency_vs_macs, markdown_table
    from .unet_latency import InputShape, ModelUnderTest, bench_unets, speedups

    out = Path(args.out)
    t0 = time.perf_counter()
    dense = random_sd21(args.seed)
    space = ArchSpace.from_unet(dense)
    g = torch.Generator().manual_seed(args.seed)
    archs = {f"keep_{k:.2f}": space.sample(generator=g, keep=k) for k in args.keep}
    if args.round_to > 1:
        from aptp_export.rounding import round_units

        archs = {n: round_units(space, a, args.round_to) for n, a in archs.items()}
    result = {"config": vars(args), "threads": torch.get_num_threads(), "sizes": {}}
    all_rows = []
    for size in args.sizes:
        dense_macs = space.dense_macs(size, size, 77)
        spec = unet_spec(4, (size, size), 77, 1024, batch=(2, 2, 2))
        models = []
        for name, arch in [("dense", None), *archs.items()]:
            path = out / "onnx" / f"{size}" / f"{name}.onnx"
            model = dense if arch is None else space.materialize(dense, arch)
            macs = dense_macs if arch is None else space.macs(arch.tolist(), size, size, 77)
            if not path.exists():
                t = time.perf_counter()
                res = export_onnx(UNetGraph(model), spec, path)
                print(f"[{size}] exported {name} in {time.perf_counter() - t:.0f} s "
                      f"(max rel err vs torch {max(res.max_rel_error.values()):.1e})", flush=True)
            params = sum(p.numel() for p in model.parameters())
            loader = (lambda: dense) if arch is None else (lambda a=arch: space.materialize(dense, a))
            models.append(ModelUnderTest(name, macs, macs / dense_macs, params, onnx=path, load_torch=loader))
            del model
            gc.collect()
        shape = InputShape(4, size, size, 77, 1024)
        rows = []
        for backend in args.backends:  # one backend at a time keeps peak memory to one set of models
            rows += bench_unets(models, shape, [1], [backend], warmup=args.warmup, repeats=args.repeats)
            gc.collect()
        for r in rows:
            r["latent"] = size
        all_rows += rows
        result["sizes"][size] = {"dense_gmacs": dense_macs / 1e9, "rows": rows, "speedups": speedups(rows)}
        latency_vs_macs(rows, out / f"sd21_latency_vs_macs_{size}.png",
                        title=f"SD 2.1 UNet architecture, {size}x{size} latent, batch 2")
        print(markdown_table(rows, [("expert", "model", ""), ("backend", "backend", ""), ("macs_fraction", "MACs frac", ".3f"),
                                    ("latency_ms_median", "median ms", ".0f"), ("latency_fraction", "latency frac", ".3f"),
                                    ("latency_over_macs", "lat/MACs", ".3f")]), flush=True)
        for s in result["sizes"][size]["speedups"]:
            print(f"[{size}] {s['expert']}: torch {s['torch_ms']:.0f} ms, onnxruntime {s['onnxruntime_ms']:.0f} ms, "
                  f"x{s['speedup']:.2f}", flush=True)
    result["peak_rss_gb"] = peak_rss_gb()
    result["seconds"] = time.perf_counter() - t0
    write_json(out / "sd21_bench.json", result)
    write_text(out / "sd21_bench.csv", rows_to_csv(all_rows))
    print(f"wrote {out / 'sd21_bench.json'} ({result['seconds'] / 60:.1f} min, peak RSS {result['peak_rss_gb']:.1f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
