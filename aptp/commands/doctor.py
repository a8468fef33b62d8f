"""Print what this machine can run, for bug reports: versions of aptp, torch (if installed), the CPU
model and the ISA flags that pick numpy/torch/onnxruntime kernels (all flags with --json),
onnxruntime (which flavour, its available and its *working* providers: a one-node graph is run on
each), TensorRT, cuda-python, the NVIDIA driver, the GPU and its compute capability; with --export,
whether that export's TensorRT plans match this machine. Torch-free (uses only engines).
Exit status 1 when --export's plans cannot run here, else 0."""

from __future__ import annotations

import json
from pathlib import Path

from engines.backends.doctor import collect, format_report
from engines.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--export", "--engines", dest="export", default=None, metavar="DIR",
                        help="also check this export directory's TensorRT plans against this machine")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args) -> int:
    if args.export is not None and not Path(args.export).is_dir():
        raise UserError(f"{args.export}: not a directory")
    report = collect(args.export)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report.get("export", {}).get("plans_match") is False else 0
