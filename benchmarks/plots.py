"""PNG plots of benchmark rows (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from engines.fileio import atomic_path


def latency_vs_macs(rows: list[dict], path: str | Path, title: str = "Latency against MACs",
                    batch: int | None = None) -> Path:
    """Scatter of latency fraction against MACs fraction per backend, with the y = x line.

    Points under the line are experts whose latency fell faster than their MACs."""

    matplotlib.use("Agg")

    sel = [r for r in rows if batch is None or r["batch"] == batch]
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    lo = min([r["macs_fraction"] for r in sel] + [r["latency_fraction"] for r in sel] + [0.3])
    ax.plot([lo * 0.9, 1.05], [lo * 0.9, 1.05], "k--", lw=1, label="latency = MACs")
    markers = {"onnxruntime": "o", "onnxruntime-cuda": "D", "torch": "s", "tensorrt": "^", "openvino-int8": "v"}
    for backend in sorted({r["backend"] for r in sel}):
        for b in sorted({r["batch"] for r in sel}):
            pts = [r for r in sel if r["backend"] == backend and r["batch"] == b]
            ax.scatter([r["macs_fraction"] for r in pts], [r["latency_fraction"] for r in pts],
                       marker=markers.get(backend, "x"), label=f"{backend}, UNet batch {b}")
            # labels of neighbouring points (sorted by MACs) take turns around their point, so they do not overlap
            offsets = ((4, 4), (4, -10), (-16, 4), (-16, -10))
            named = sorted((r for r in pts if r["expert"] != "dense"), key=lambda r: r["macs_fraction"])
            for i, r in enumerate(named):
                ax.annotate(str(r["expert"]).replace("expert_", "e"), (r["macs_fraction"], r["latency_fraction"]),
                            fontsize=7, xytext=offsets[i % len(offsets)], textcoords="offset points")
    ax.set_xlabel("MACs / dense MACs")
    ax.set_ylabel("median latency / dense median latency")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """Lay out `fig`, write it as PNG atomically (temporary name, then rename) and close it."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig_kwargs)
    plt.close(fig)
    return path


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows -> a Markdown table; columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key, "")
            cells.append(format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])
