"""Measure real latency against MACs for every expert of an export (and the dense reference).

For each expert and the dense model: median and p90 latency of one UNet evaluation with the
CFG-doubled batch, MACs fraction and latency fraction, per backend (onnxruntime; torch eager with
--run; TensorRT where plans exist); router cost per prompt; mixed-prompt throughput with per-expert
batching against one prompt at a time. Writes OUT/bench.json, OUT/bench.csv and a PNG plot.
"""

import argparse
from pathlib import Path

from aptp.args import add_export_argument
from benchmarks.names import UNET_BACKENDS as BACKENDS
from engines.errors import UserError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(p):
    add_export_argument(p, help="export directory (with manifest.json and the dense model, `aptp export --with-dense`)")
    p.add_argument("--run", default=None, help="training run the export came from (enables torch eager timing)")
    p.add_argument("--out", default=None,
                   help="output directory (default: EXPORT.bench beside the export, e.g. aptp-demo/export.bench; "
                        "the demo's own bench/ is left alone)")
    p.add_argument("--backend", action="append", choices=list(BACKENDS),
                   help="backend to time (repeatable; default: every one available)")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8],
                   help="prompts per UNet call, comma-separated (the UNet batch is twice that with CFG)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median reported)")
    p.add_argument("--throughput-steps", type=int, default=10, help="denoising steps in the throughput test")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads of both onnxruntime and torch in the UNet timings (default 0: each "
                        "library's own default); 1 removes thread-pool noise on a shared machine")


def run(args) -> int:
    engines = Path(args.export)
    if not (engines / "manifest.json").is_file():
        raise UserError(f"{engines}: not an export directory (no manifest.json)")
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    if args.threads < 0:
        raise UserError("--threads must be >= 0")
    from benchmarks.engines_bench import run_bench  # heavy (torch): only when the verb runs
    from training.rundir import RunDir

    if args.run is not None and not RunDir(args.run).has_config():
        raise UserError(f"{args.run}: not a training run directory (no config.yaml)")

    out = Path(args.out) if args.out else engines.parent / f"{engines.resolve().name}.bench"
    run_bench(engines, out, run_dir=args.run, backends=args.backend, prompts_per_batch=args.batch_sizes,
              repeats=args.repeats, throughput_steps=args.throughput_steps, threads=args.threads)
    return 0
