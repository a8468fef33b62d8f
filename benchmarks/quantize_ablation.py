"""What calibrating each expert on its own prompts buys over random prompts (issue 23), on one export.

    python -m benchmarks.quantize_ablation --export aptp-demo/export --out bench/quantize_ablation \\
        [--fp32-groups time_embedding,conv_in,outer_blocks] [--experts 0,1,2] [--guidance 3]

For each expert, two int8 graphs that differ only in their calibration prompts: the first `per_expert`
training prompts the router sends to the expert ("own"), or as many drawn at random from the same pool
("random"); both with the same layer groups kept in fp32 (`--fp32-groups`, default none = plain int8), the
same steps, guidance and guard prompts (held-out prompts routed to the expert). The figure is the guard's
end-to-end image PSNR against the fp32 expert (worst and mean), paired per expert.

Writes OUT/quantize_ablation.json and .md.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from aptp_export.quantize import QuantizeOptions, quantize_export
from training.toy import EVAL_SEED, captions
from engines.fileio import write_json, write_text

from .timing import machine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True)
    ap.add_argument("--out", default="bench/quantize_ablation")
    ap.add_argument("--experts", default=None, help="comma-separated ids (default all)")
    ap.add_argument("--fp32-groups", default="", help="layer groups kept fp32 in both variants")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--per-expert", type=int, default=16)
    ap.add_argument("--guard-per-expert", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    experts = [int(x) for x in args.experts.split(",")] if args.experts else None
    groups = [g for g in args.fp32_groups.split(",") if g]
    res = {}
    for variant in ("own", "random"):
        tmp = Path(tempfile.mkdtemp(prefix="aptp-ablation-"))
        try:
            opts = QuantizeOptions(prompts=[c for c, _ in captions(1024, seed=0)],
                                   guard_prompts=[c for c, _ in captions(1024, seed=EVAL_SEED + 13)],
                                   guidance=args.guidance, steps=args.steps, per_expert=args.per_expert,
                                   guard_per_expert=args.guard_per_expert, min_psnr=0.0, mean_psnr=0.0,
                                   scan=False, experts=experts, fp32_groups=groups or None,
                                   random_calibration=variant == "random", threads=args.threads)
            rep = quantize_export(args.export, tmp / "q", opts)
            res[variant] = {e["id"]: e["tried"][0] for e in rep["experts"]}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for k in res["own"]:
        o, r = res["own"][k], res["random"][k]
        rows.append({"expert": k, "own_min": o["psnr_min"], "own_mean": o["psnr_mean"], "random_min": r["psnr_min"],
                     "random_mean": r["psnr_mean"], "gain_min_db": o["psnr_min"] - r["psnr_min"],
                     "gain_mean_db": o["psnr_mean"] - r["psnr_mean"]})
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("own_min", "own_mean", "random_min", "random_mean",
                                                                  "gain_min_db", "gain_mean_db")}
    summary["own_better_on"] = sum(r["gain_mean_db"] > 0 for r in rows)
    result = {"settings": vars(args), "machine": machine(), "rows": rows, "summary": summary,
              "seconds": time.perf_counter() - t0}
    write_json(out / "quantize_ablation.json", result)
    lines = ["# Calibration on each expert's own prompts vs random prompts", "",
             f"int8 with {', '.join(groups) or 'no layer group'} kept in fp32; guard PSNR (dB) of end-to-end images "
             f"against fp32, {args.guard_per_expert} held-out prompts per expert, {args.steps} steps, guidance "
             f"{args.guidance}.", "",
             "| expert | own: min / mean | random: min / mean | gain min / mean |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['expert']} | {r['own_min']:.1f} / {r['own_mean']:.1f} | {r['random_min']:.1f} / "
                     f"{r['random_mean']:.1f} | {r['gain_min_db']:+.1f} / {r['gain_mean_db']:+.1f} |")
    s = summary
    lines.append(f"| mean | {s['own_min']:.1f} / {s['own_mean']:.1f} | {s['random_min']:.1f} / {s['random_mean']:.1f} | "
                 f"{s['gain_min_db']:+.1f} / {s['gain_mean_db']:+.1f} |")
    lines.append(f"\nOwn prompts better (mean PSNR) on {s['own_better_on']} of {len(rows)} experts.")
    write_text(out / "quantize_ablation.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
