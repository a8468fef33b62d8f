"""Latency against MACs at SDXL scale: the SDXL base UNet architecture (random weights), onnxruntime CPU; with
`--model pixart` / `--model sd3` the PixArt-Sigma XL-2 or SD3-medium transformer instead (issue 25).

    python -m benchmarks.sdxl_latency [--model sdxl|pixart|sd3] [--size 64] [--keep 0.9 0.7 0.5] [--seed 0]
                                      [--repeats 3] [--settle 1] [--threads 1] [--limit-gb 20] [--no-dense]
                                      [--out DIR] [--onnx-dir DIR]

Experts: random architecture vectors at the given keep ratios (ArchSpace.sample, one generator seeded with
`--seed`, drawn in order, as benchmarks.sd21_latency does), and the dense UNet. UNet batch 2 (one prompt with
CFG), 77 tokens, SDXL's text_embeds [N, 1280] and time_ids [N, 6]. PixArt: 300 T5 tokens and their mask;
SD3: 333 tokens (77 CLIP + 256 T5) and the pooled projection [N, 2048]; both exported at a fixed latent size
(export_spec.dit_unet_spec), so their check input differs from the traced one in batch only.

Memory is what shapes this benchmark: the dense UNet is 10.3 GB in float32. Every model is exported in its own
child process, watched by this one, which kills it as soon as its RSS passes `--limit-gb` (the machine is
shared; the kernel's OOM killer could pick another process). The child's phases, each with its own peak RSS
(benchmarks.memwatch):

1. build: a fresh random dense UNet (meta -> empty -> filled in place; benchmarks.materialize_sd21).
2. materialise: `apply_arch_` prunes it in place (peak: dense + one layer), experts only.
3. torch_reference: the output on the check input (batch 1, (size-8)^2 latent: other sizes than the traced
   ones, as export_onnx checks), kept; the only torch forward besides the export's trace.
4. export: `export_onnx(..., verify=False)`; the > 2 GB graph's weights are copied tensor by tensor into one
   external-data file, never loaded whole (aptp_export.onnx_export._save_streaming).
5. the torch module is freed; ort_session: an onnxruntime CPU session (`--threads` intra-op threads);
   ort_check: max|onnx - torch| / max|torch| on the check input (must be <= 1e-4).

A child that passes the limit or dies is recorded with the phase it was in and its last RSS; the others
are timed. Timing runs in one more watched child holding one session at a time (two SDXL-size sessions do
not fit in 24 GB): `--repeats` rounds, each opening every model's session in turn, `--settle` untimed calls,
one timed call, closing it; per model the median over rounds, and the paired estimators of
benchmarks.unet_latency (per-round ratio to the reference, ratio of minima, CPU-time ratio). Latency
fractions are against the dense model if it was timed, else against the largest expert that was.

Writes OUT/<model>_bench.json, OUT/<model>_table_<size>.md, OUT/<model>_latency_vs_macs_<size>.png; graphs go
to --onnx-dir (default OUT/onnx/<size> for sdxl, OUT/onnx/<model>-<size> otherwise; records likewise in
OUT/records[-<model>]) and are reused when their export record says they passed the check.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from aptp_export import ArchSpace
from aptp_export.export_spec import dit_unet_spec, unet_spec
from aptp_export.materialize import apply_arch_
from aptp_export.onnx_export import (
    FP32_RTOL,
    UNetGraph,
    check_inputs,
    export_onnx,
    relative_errors,
    torch_reference,
)
from aptp_export.unet_configs import (
    PIXART_SIGMA_CONFIG,
    SD3_MEDIUM_CONFIG,
    SD3_TEXT_LEN,
    SDXL_UNET_CONFIG,
    added_cond_dims,
    backbone_of,
)
from engines.fileio import write_json, write_text
from engines.backends.ort import OrtSession

from .materialize_sd21 import random_unet
from .memwatch import Phases, read_progress, rss_gb, run_watched
from .plots import latency_vs_macs, markdown_table
from .sd21_latency import ROBUSTNESS_COLUMNS, onnx_param_count, arch_tag
from .timing import timing_summary, machine
from .unet_latency import InputShape, paired_timings, unet_feeds

TEXT_LEN = 77
# --model -> (architecture, text tokens, plot title)
MODELS = {"sdxl": (SDXL_UNET_CONFIG, TEXT_LEN, "SDXL UNet architecture"),
          "pixart": (PIXART_SIGMA_CONFIG, 300, "PixArt-Sigma XL-2 transformer"),
          "sd3": (SD3_MEDIUM_CONFIG, SD3_TEXT_LEN, "SD3-medium transformer")}
TABLE_COLUMNS = [("model", "model", ""), ("macs_fraction", "MACs fraction", ".3f"), ("gmacs", "GMACs", ".1f"),
                 ("params_m", "params (M)", ".0f"), ("onnxruntime_ms", "ORT ms", ".0f"),
                 ("latency_fraction", "ORT latency fraction", ".3f"), ("latency_over_macs", "latency / MACs", ".3f")]


def sdxl_spec(config: dict, size: int):
    """The export spec of an SDXL-class UNet: traced at batch 2 and size x size, dynamic down to batch 1 and
    size/2 (the check input's batch 1 and size - 8)."""
    text_dim, ids = added_cond_dims(config)
    return unet_spec(config["in_channels"], (size, size), TEXT_LEN, config["cross_attention_dim"], batch=(1, 2, 2),
                     size_range=(size // 2, size), text_embeds_dim=text_dim, time_ids_dim=ids)


def sdxl_shape(config: dict, size: int) -> InputShape:
    text_dim, ids = added_cond_dims(config)
    return InputShape(config["in_channels"], size, size, TEXT_LEN, config["cross_attention_dim"],
                      text_embeds_dim=text_dim, time_ids_dim=ids)


def model_spec(config: dict, size: int, text_len: int = TEXT_LEN):
    """The export spec for any --model: sdxl_spec for a UNet, dit_unet_spec (fixed size, batch 1-2) for a DiT."""
    if backbone_of(config) == "unet":
        return sdxl_spec(config, size)
    return dit_unet_spec(config, (size, size), text_len, batch=(1, 2, 2))


def model_shape(config: dict, size: int, text_len: int = TEXT_LEN) -> InputShape:
    kind = backbone_of(config)
    if kind == "unet":
        return sdxl_shape(config, size)
    if kind == "pixart":
        return InputShape(config["in_channels"], size, size, text_len, config["caption_channels"], caption_mask=True)
    return InputShape(config["in_channels"], size, size, text_len, config["joint_attention_dim"],
                      pooled_dim=config["pooled_projection_dim"])


def plan_models(space: ArchSpace, keep: list[float], seed: int, dense: bool = True) -> dict:
    """name -> architecture vector (None: the dense UNet), smallest expert first, the dense model last: the
    likeliest to fit run first."""
    g = torch.Generator().manual_seed(seed)
    archs = {f"keep_{k:.2f}": space.sample(generator=g, keep=k) for k in keep}
    order = sorted(archs, key=lambda n: float(archs[n].sum()))
    return {**{n: archs[n] for n in order}, **({"dense": None} if dense else {})}


def graph_path(onnx_dir: Path, name: str, arch, seed: int) -> Path:
    return onnx_dir / f"{name}-{f'seed{seed}' if arch is None else arch_tag(arch, seed)}.onnx"


def reference_model(names: list[str], macs: dict[str, float]) -> str:
    """The model latency fractions are taken against: the dense one, else the largest by MACs."""
    return "dense" if "dense" in names else max(names, key=lambda n: macs[n])


def timing_rows(calls: dict[str, list], macs: dict[str, float], dense_macs: float, params: dict[str, int],
                size: int) -> list[dict]:
    """Rows (one per model) from `calls` (name -> [(wall s, CPU s)] per round): medians and fractions against
    `reference_model`; `macs_fraction` is against the dense model, `latency_over_macs` compares the latency
    fraction with the MACs fraction of the same reference."""
    ref = reference_model(list(calls), macs)
    paired = paired_timings(calls, 0, ref=ref)
    ref_median = timing_summary([w for w, _ in calls[ref]]).median_ms
    rows = []
    for name, c in calls.items():
        t = timing_summary([w for w, _ in c])
        frac = t.median_ms / ref_median
        rows.append({"expert": name, "backend": "onnxruntime", "batch": 2, "prompts": 1, "latent": size,
                     "macs": macs[name], "macs_fraction": macs[name] / dense_macs, "params": params.get(name, 0),
                     "reference": ref, **t.as_dict(), "latency_fraction": frac,
                     "latency_over_macs": frac / (macs[name] / macs[ref]), **paired[name]})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    return [{"model": r["expert"], "macs_fraction": r["macs_fraction"], "gmacs": r["macs"] / 1e9,
             "params_m": r["params"] / 1e6, "onnxruntime_ms": r["latency_ms_median"],
             "latency_fraction": r["latency_fraction"], "latency_over_macs": r["latency_over_macs"],
             "onnxruntime_latency_fraction": r["latency_fraction"],
             "onnxruntime_latency_fraction_paired": r["latency_fraction_paired"],
             "onnxruntime_latency_fraction_min": r["latency_fraction_min"],
             "onnxruntime_cpu_fraction": r["cpu_fraction"]} for r in rows]


# ------------------------------------------------------------------------------------------- children
def export_one(config: dict, name: str, arch, path: Path, size: int, seed: int, threads: int,
               progress: Path, text_len: int = TEXT_LEN) -> dict:
    """Phases 1-5 of the module doc for one model; returns (and leaves in `progress`) its record."""
    torch.set_num_threads(threads)
    phases = Phases(progress, model=name)
    spec = model_spec(config, size, text_len)
    with phases("build"):
        unet = random_unet(config, seed)
    if arch is not None:
        with phases("materialise"):
            apply_arch_(ArchSpace.from_config(config), unet, arch.numpy() > 0.5)
    phases.note(params=sum(p.numel() for p in unet.parameters()))
    models = [UNetGraph(unet)]
    del unet
    export_and_check(phases, models, spec, path, threads)
    return read_progress(progress)


def export_and_check(phases: Phases, models: list, spec, path: Path, threads: int) -> dict[str, float]:
    """Phases 3-5 of the module doc for the graph module in `models` (a one-element list the function empties, so
    that the torch module is freed before onnxruntime loads the graph: the caller keeps no other reference).
    Notes the errors, whether they pass, and the check input's shapes in `phases`; returns the errors."""
    graph = models.pop()
    with phases("torch_reference"):
        inputs = check_inputs(spec, seed=1)
        ref = torch_reference(graph, inputs)
    with phases("export") as rec:
        res = export_onnx(graph, spec, path, verify=False)
        rec["export_s"] = res.seconds
        rec["bytes"] = {k: p.stat().st_size for k, p in res.files.items()}
    del graph
    gc.collect()
    phases.note(rss_torch_freed_gb=rss_gb())
    with phases("ort_session"):
        sess = OrtSession(path, "cpu", threads=threads)
    with phases("ort_check"):
        errors = relative_errors(path, spec, inputs, ref, lambda feeds: [sess.run(feeds)[n] for n in spec.output_names])
    phases.note(max_rel_error=errors, ok=all(v <= FP32_RTOL for v in errors.values()),
                check_input={t.name: list(x.shape) for t, x in zip(spec.inputs, inputs, strict=True)})
    return errors


def time_models(config: dict, paths: dict[str, Path], size: int, repeats: int, settle: int, threads: int,
                progress: Path, text_len: int = TEXT_LEN) -> dict:
    """Reload rounds (module doc): name -> [(wall s, CPU s)] of the timed calls, plus open times and phases."""
    torch.set_num_threads(threads)
    phases = Phases(progress, models=list(paths))
    feeds = unet_feeds(model_shape(config, size, text_len), 1)
    calls = {n: [] for n in paths}
    opens = {n: [] for n in paths}
    for r in range(repeats):
        for name, path in paths.items():
            with phases(f"round{r}:{name}"):
                t = time.perf_counter()
                sess = OrtSession(path, "cpu", threads=threads)
                opens[name].append(time.perf_counter() - t)
                for _ in range(settle):
                    sess.run(feeds)
                c, t = time.process_time(), time.perf_counter()
                sess.run(feeds)
                calls[name].append((time.perf_counter() - t, time.process_time() - c))
                del sess
                gc.collect()
            phases.note(calls=calls, open_s=opens)
    return read_progress(progress)


# ------------------------------------------------------------------------------------------- report
def phase_peaks(record: dict) -> dict[str, float]:
    """phase -> peak RSS GB (the maximum over rounds for the timing child's `roundN:model` phases)."""
    out = {}
    for p in record.get("phases", []):
        key = p["phase"].split(":", 1)[-1] if p["phase"].startswith("round") else p["phase"]
        out[key] = max(out.get(key, 0.0), p["peak_gb"])
    return out


def report(result: dict, size: int, table: str, robust: str) -> str:
    lines = [table, "", "Latency fraction, other estimators:", "", robust, "",
             f"Latency fractions against **{result.get('reference', '?')}**.", "",
             "Export (one child process per model; peak RSS per phase, GB):", "",
             "| model | status | build | materialise | torch_reference | export | ort_session | ort_check | "
             "export s | graph GB | ONNX vs torch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in result["exports"].items():
        pk = phase_peaks(e)
        ex = next((p for p in e.get("phases", []) if p["phase"] == "export"), {})
        err = max((e.get("max_rel_error") or {"": float("nan")}).values())
        cells = [name, e.get("status", "?")] + [f"{pk[k]:.1f}" if k in pk else "" for k in
                                                ("build", "materialise", "torch_reference", "export",
                                                 "ort_session", "ort_check")]
        cells += [f"{ex['export_s']:.0f}" if "export_s" in ex else "",
                  f"{sum(ex['bytes'].values()) / 1e9:.2f}" if "bytes" in ex else "", f"{err:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    t = result.get("timing", {})
    if t:
        pk = phase_peaks(t)
        lines += ["", "Timing child (one session at a time): peak RSS per model "
                  + ", ".join(f"{k} {v:.1f} GB" for k, v in pk.items()) + "; session open s (median) "
                  + ", ".join(f"{k} {np.median(v):.0f}" for k, v in t.get("open_s", {}).items()) + "."]
    lines += ["", f"Machine: load average at start {result['loadavg_start']}, at end {result.get('loadavg_end')}; "
              f"{result['threads']} onnxruntime intra-op thread(s), torch threads {result['threads']}; "
              f"{result['seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def _child_cmd(argv: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.sdxl_latency", *argv, *extra]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="sdxl",
                    help="architecture (random weights): SDXL base UNet, PixArt-Sigma XL-2 or SD3-medium")
    ap.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timing rounds (one timed call per model and round)")
    ap.add_argument("--settle", type=int, default=1, help="untimed calls after each session opens")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op and torch threads")
    ap.add_argument("--limit-gb", type=float, default=20.0, help="kill a child whose RSS passes this")
    ap.add_argument("--no-dense", action="store_true", help="leave out the dense model")
    ap.add_argument("--out", default="bench/sdxl")
    ap.add_argument("--onnx-dir")
    ap.add_argument("--unet-config", help=argparse.SUPPRESS)  # a JSON UNet config instead of SDXL's (tests)
    ap.add_argument("--export-one", help=argparse.SUPPRESS)
    ap.add_argument("--time-only", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    base = list(argv)
    config, text_len, title = MODELS[args.model]
    config = json.loads(Path(args.unet_config).read_text()) if args.unet_config else config
    tag = args.model
    out = Path(args.out)
    # per model (sdxl keeps its original paths): a dense graph or record of one model is never another's
    sub = str(args.size) if tag == "sdxl" else f"{tag}-{args.size}"
    onnx_dir = Path(args.onnx_dir) if args.onnx_dir else out / "onnx" / sub
    space = ArchSpace.from_config(config)
    models = plan_models(space, args.keep, args.seed, dense=not args.no_dense)
    paths = {n: graph_path(onnx_dir, n, a, args.seed) for n, a in models.items()}
    logs = out / ("records" if tag == "sdxl" else f"records-{tag}")
    if args.export_one:
        export_one(config, args.export_one, models[args.export_one], paths[args.export_one], args.size, args.seed,
                   args.threads, logs / f"export-{args.export_one}.json", text_len)
        return 0
    if args.time_only:
        time_models(config, {n: paths[n] for n in args.time_only}, args.size, args.repeats, args.settle, args.threads,
                    logs / f"timing-{args.size}.json", text_len)
        return 0

    t0 = time.perf_counter()
    logs.mkdir(parents=True, exist_ok=True)
    dense_macs = space.dense_macs(args.size, args.size, text_len)
    macs = {n: dense_macs if a is None else space.macs(a.tolist(), args.size, args.size, text_len)
            for n, a in models.items()}
    result = {"config": vars(args), "machine": machine(), "threads": args.threads, "loadavg_start": os.getloadavg(),
              "dense_gmacs": dense_macs / 1e9, "dense_gmacs_1024px": space.dense_macs(128, 128, text_len) / 1e9,
              "exports": {}}
    for name in models:
        prog = logs / f"export-{name}.json"
        rec = read_progress(prog)
        if rec.get("ok") and paths[name].exists():
            result["exports"][name] = {**rec, "status": "ok (cached)"}
            continue
        prog.unlink(missing_ok=True)
        w = run_watched(_child_cmd(base, "--export-one", name), args.limit_gb, prog)
        rec = w.progress
        status = ("ok" if rec.get("ok") else "ONNX differs from torch") if w.returncode == 0 else (
            f"killed over {args.limit_gb} GB in phase {w.phase} (RSS {w.rss_gb:.1f} GB)" if w.killed
            else f"died (rc {w.returncode}) in phase {w.phase} (RSS {w.rss_gb:.1f} GB)")
        result["exports"][name] = {**rec, "status": status, "sampled_peak_gb": w.peak_gb, "seconds": w.seconds}
        print(f"[export] {name}: {status}, {w.seconds:.0f} s, sampled peak {w.peak_gb:.1f} GB", flush=True)
        write_json(out / f"{tag}_bench.json", {**result, "partial": True})

    timed = [n for n in models if result["exports"][n].get("ok")]
    result["reference"] = reference_model(timed, macs) if timed else None
    rows = []
    if timed:
        prog = logs / f"timing-{args.size}.json"
        prog.unlink(missing_ok=True)
        w = run_watched(_child_cmd(base, "--time-only", *timed), args.limit_gb, prog)
        t = w.progress
        t["status"] = "ok" if w.returncode == 0 else f"rc {w.returncode}, killed {w.killed}, phase {w.phase}"
        result["timing"] = t
        calls = {n: c for n, c in t.get("calls", {}).items() if len(c) == args.repeats}
        if calls:
            params = {n: onnx_param_count(paths[n]) for n in calls}
            rows = timing_rows(calls, macs, dense_macs, params, args.size)
    result.update(rows=rows, loadavg_end=os.getloadavg(), seconds=time.perf_counter() - t0)
    summ = summary(rows)
    result["summary"] = summ
    table = markdown_table(summ, TABLE_COLUMNS)
    robust = markdown_table(summ, ROBUSTNESS_COLUMNS[:6])
    write_json(out / f"{tag}_bench.json", result)
    write_text(out / f"{tag}_table_{args.size}.md", report(result, args.size, table, robust))
    if rows:
        latency_vs_macs(rows, out / f"{tag}_latency_vs_macs_{args.size}.png",
                        title=f"{title}, {args.size}x{args.size} latent, batch 2"
                        + ("" if result["reference"] == "dense" else f"\n(latency against {result['reference']})"))
    print((out / f"{tag}_table_{args.size}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
