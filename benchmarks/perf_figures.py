"""Figures for the README's performance section from `benchmarks.sd21_latency` results.

    python -m benchmarks.perf_figures --bench OUT/sd21_bench.json --out docs/perf [--name sd21]

Per latent size: `NAME_latency_vs_macs_SIZE.png`, onnxruntime and torch latency fraction against MACs
fraction (marker = median-based fraction; bar = the range of the other estimators: median of
per-round paired ratios, ratio of minima and, for onnxruntime, the CPU-time ratio), with the y = x line and the acceptance
line y = 1.05 x; rounded experts (`_rN`) are joined to their unrounded expert by an arrow. Also
`NAME_table_SIZE.md` (the summary table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from engines.fileio import write_text

from .plots import markdown_table, save_figure
from .sd21_latency import LAT_TOLERANCE, ROBUSTNESS_COLUMNS, TABLE_COLUMNS

ESTIMATORS = ("latency_fraction", "latency_fraction_paired", "latency_fraction_min", "cpu_fraction")


def plot_summary(summary: list[dict], path: Path, title: str, backends=("onnxruntime", "torch")) -> Path:
    matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(6.2, 4.8), dpi=130)
    xs = [d["macs_fraction"] for d in summary]
    lo, hi = min(xs + [0.45]) - 0.05, 1.03
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="latency = MACs")
    ax.plot([lo, hi], [lo * LAT_TOLERANCE, hi * LAT_TOLERANCE], color="0.6", ls=":", lw=1,
            label=f"latency = {LAT_TOLERANCE} x MACs")
    style = {"onnxruntime": ("o", "tab:blue"), "torch": ("s", "tab:orange")}
    by_name = {d["model"]: d for d in summary}
    for b in backends:
        pts = [d for d in summary if f"{b}_latency_fraction" in d]
        if not pts:
            continue
        marker, color = style.get(b, ("x", "k"))
        for i, d in enumerate(pts):
            # torch's CPU time counts OpenMP threads spinning while they wait: not an estimator of its latency
            est = [d[f"{b}_{k}"] for k in ESTIMATORS if f"{b}_{k}" in d and (b != "torch" or k != "cpu_fraction")]
            y = d[f"{b}_latency_fraction"]
            rounded = "_r" in d["model"]
            ax.errorbar([d["macs_fraction"]], [y], yerr=[[y - min(est)], [max(est) - y]], fmt=marker,
                        color=color, mfc="white" if rounded else color, ms=6, capsize=2, lw=0.8,
                        label=(f"{b}" if i == 0 else None))
            if b == "onnxruntime" and d["model"] != "dense":
                ax.annotate(d["model"].replace("keep_", ""), (d["macs_fraction"], y), fontsize=6.5,
                            xytext=(4, -9 if rounded else 3), textcoords="offset points")
            base = d["model"].rsplit("_r", 1)[0]
            if rounded and base in by_name and f"{b}_latency_fraction" in by_name[base]:
                src = by_name[base]
                ax.annotate("", (d["macs_fraction"], y), (src["macs_fraction"], src[f"{b}_latency_fraction"]),
                            arrowprops={"arrowstyle": "->", "color": color, "lw": 0.7, "alpha": 0.7})
    ax.set_xlim(lo, hi)
    ax.set_xlabel("MACs / dense MACs")
    ax.set_ylabel("latency / dense latency (same backend)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--bench", required=True, help="sd21_bench.json")
    ap.add_argument("--out", default="docs/perf")
    ap.add_argument("--name", default="sd21")
    args = ap.parse_args(argv)

    res = json.loads(Path(args.bench).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for size, info in res["sizes"].items():
        summary = info["summary"]
        p = plot_summary(summary, out / f"{args.name}_latency_vs_macs_{size}.png",
                         f"SD 2.1 UNet architecture (random weights), {size}x{size} latent, UNet batch 2")
        write_text(out / f"{args.name}_table_{size}.md", markdown_table(summary, TABLE_COLUMNS) + "\n\n"
                   + markdown_table(summary, ROBUSTNESS_COLUMNS) + "\n")
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
