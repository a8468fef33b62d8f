"""OUT/report.md of `aptp demo`: experts, routing, images, latency against MACs, batching."""

from __future__ import annotations

from pathlib import Path

from engines.fileio import write_text

from .evaluate import demo_quality_markdown
from .plots import markdown_table
from .static_baseline import compare_markdown


def static_section(cmp: dict) -> list[str]:
    """Routed vs static vs dense at equal mean MACs and equal fine-tuning compute (static_baseline)."""
    c = cmp["compute"]
    lines = ["", "## Routed experts against one static pruned model", "",
             f"The static model (K = 1, `static/export`) is pruned with this run's config, its code moved onto the "
             f"mixture's mean MACs on the held-out prompts ({c['target_macs']:.4f}; static {c['static_macs']:.4f}) "
             f"and fine-tuned with the same total compute (steps x MACs fraction x batch: routed "
             f"{c['routed']['total']:.0f}, static {c['static']['compute']:.0f}, ratio {c['compute_ratio']:.3f}).", "",
             compare_markdown(cmp, c)]
    if cmp.get("paired"):
        lines.append(f"The routed mixture is closer to the teacher than the static model on "
                     f"{cmp['paired']['routed_better_share']:.0%} of the held-out prompts.")
    if cmp.get("images"):
        lines += ["", "Rows: routed expert, static model, dense teacher; two prompts per difficulty (easy, medium, "
                  "hard), same seeds.", "", f"![routed vs static vs dense]({cmp['images']})"]
    return lines


def write_report(out: str | Path, routing: dict, bench: dict, times: dict) -> Path:
    """Compose the Markdown report from the demo's routing/generation figures and bench.json."""

    out = Path(out)
    lines = ["# APTP demo report (toy teacher, toy world, CPU)", ""]
    lines += ["Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()), ""]

    lines += ["## Experts", "",
              f"{routing['prompts']} held-out prompts routed by the exported router "
              f"(mean MACs fraction {routing['mean_macs_fraction']:.3f}, budget {routing['budget']}).", ""]
    rows = [{**e, "words": ", ".join(f"{w} ({c})" for w, c in e["top_words"]),
             "mix": "/".join(str(e["by_difficulty"][d]) for d in ("easy", "medium", "hard")),
             "mmacs": e["macs"] / 1e6, "mparams": e["params"] / 1e6} for e in routing["experts"]]
    lines.append(markdown_table(rows, [("id", "expert", ""), ("mmacs", "MMACs", ".1f"), ("macs_fraction", "of dense", ".3f"),
                                       ("mparams", "M params", ".2f"), ("train_share", "train share", ".3f"),
                                       ("share", "held-out share", ".3f"), ("mix", "easy/medium/hard", ""),
                                       ("words", "most frequent caption words", "")]))
    lines += ["", "Mean MACs fraction of the expert a prompt is routed to, per toy difficulty:", ""]
    lines.append(markdown_table([{"difficulty": d, **v} for d, v in routing["by_difficulty"].items()],
                                [("difficulty", "difficulty", ""), ("count", "prompts", "d"),
                                 ("mean_macs_fraction", "mean MACs fraction", ".3f")]))

    if routing.get("static"):
        lines += static_section(routing["static"])
    lines += ["", "## Images per expert", "",
              "Top row of each grid: the routed expert; bottom row: the dense teacher, same prompt and seed. "
              "Colour match = the toy scorer's check that the main object has the caption's colour.", ""]
    lines.append(markdown_table(routing["quality"], [("id", "expert", ""), ("n", "images", "d"),
                                                     ("colour_match", "colour match (expert)", ".2f"),
                                                     ("dense_colour_match", "colour match (dense)", ".2f"),
                                                     ("psnr_vs_dense_db", "median PSNR vs dense (dB)", ".1f")]))
    if routing.get("toy_clip"):
        lines += ["", demo_quality_markdown(routing["toy_clip"])]
    for e in routing["experts"]:
        if "grid" in e:
            lines += ["", f"Expert {e['id']} (MACs {e['macs_fraction']:.2f} of dense):", "", f"![expert {e['id']}]({e['grid']})"]

    threads = bench.get("machine", {}).get("bench_threads") or 0
    lines += ["", "## Latency against MACs", "",
              "Median latency of one UNet call (batch = 2 x prompts: classifier-free guidance), "
              "side by side in one run; latency fraction = median / the dense model's median on the same backend"
              + (f"; {threads} intra-op thread(s) per backend." if threads else "; default threads.") + "", ""]
    rows = sorted(bench["rows"], key=lambda r: (r["backend"], r["prompts"], r["expert"]))
    lines.append(markdown_table(rows, [("expert", "model", ""), ("backend", "backend", ""), ("batch", "UNet batch", "d"),
                                       ("macs_fraction", "MACs fraction", ".3f"), ("latency_ms_median", "median ms", ".2f"),
                                       ("latency_ms_p90", "p90 ms", ".2f"), ("latency_fraction", "latency fraction", ".3f"),
                                       ("latency_over_macs", "latency / MACs fraction", ".3f")]))
    lines += ["", "![latency against MACs](bench/latency_vs_macs.png)", ""]
    if bench.get("torch_vs_onnxruntime"):
        lines += ["onnxruntime against torch eager on the same network:", ""]
        lines.append(markdown_table(sorted(bench["torch_vs_onnxruntime"], key=lambda r: (r["batch"], r["expert"])),
                                    [("expert", "model", ""), ("batch", "UNet batch", "d"), ("torch_ms", "torch ms", ".2f"),
                                     ("onnxruntime_ms", "onnxruntime ms", ".2f"), ("speedup", "speed-up", ".2f")]))
    r, t = bench["router"], bench["throughput"]
    lines += ["", "## Routing and batching", "",
              f"- Router: {r['batched_ms_per_prompt']:.2f} ms per prompt routed in a batch of {r['prompts']} "
              f"({r['single_prompt_ms']:.2f} ms for one prompt alone); "
              + (f"{100 * r['fraction_of_25_step_generation_dense']:.2f} % of a 25-step dense generation."
                 if r.get("fraction_of_25_step_generation_dense") else ""),
              f"- Throughput on {t['prompts']} mixed prompts ({t['experts_used']} experts, {t['steps']} steps): "
              f"{t['batched_images_per_s']:.2f} images/s batched per expert against "
              f"{t['one_at_a_time_images_per_s']:.2f} images/s one prompt at a time ({t['speedup']:.2f}x).", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
