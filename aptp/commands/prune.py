"""Pruning phase: train the prompt router and K architecture codes on the frozen base UNet.

Reads a YAML config (training/configs/toy.yaml is the default), writes RUN/config.yaml (resolved),
RUN/prune/{router.safetensors, codes.safetensors, router.json, summary.json, log.jsonl} and periodic
checkpoints; --resume continues a killed run exactly where its last checkpoint stopped.
Runs under `accelerate launch --num_processes N` unchanged (the global batch is split over processes).
"""

from __future__ import annotations

import json
import logging



def add_arguments(parser) -> None:
    import argparse

    from training.config_catalog import catalog_text

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("packaged configs (`aptp config show NAME` prints one with the model and data layouts it needs):\n"
                     + catalog_text())
    parser.add_argument("--config", default="toy",
                        help="YAML config file, or the name of a packaged config (listed below); default: toy")
    parser.add_argument("--run-dir", default=None, help="output directory (default: RUNS_DIR/NAME from the config)")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set prune.budget=0.75 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from training.config import load_config, resolve_config_arg  # heavy (torch): only when the verb runs
    from training.prune import run_prune

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(resolve_config_arg(args.config), overrides=args.set)
    summary = run_prune(cfg, args.run_dir, resume=args.resume, progress=not args.no_progress)
    run_dir = args.run_dir or str(cfg.run_dir())
    shares = " ".join(f"{s:.2f}" for s in summary["shares"])
    macs = " ".join(f"{m:.2f}" for m in summary["expert_macs"])
    print(f"pruning done: {run_dir}/prune  mean MACs fraction {summary['mean_macs']:.3f} "
          f"(budget {summary['budget']})")
    print(f"experts' MACs fractions: {macs}")
    print(f"training-set shares:     {shares}")
    if args.no_progress:
        print(json.dumps({k: v for k, v in summary.items() if k != "groups"}))
    return 0
