"""`aptp quantize`: int8 OpenVINO IR per expert, calibrated on the expert's own prompts, with a quality guard.

    from aptp_export.quantize import QuantizeOptions, quantize_export
    report = quantize_export("aptp-demo/export", "aptp-demo/export-int8", QuantizeOptions(guidance=3.0))

What it does, per expert (docs/quantization.md has the measurements behind each choice):

1. **Calibration on the expert's own prompts, along the trajectory.** A pool of training prompts (the toy
   world's training captions, or `--prompts FILE`) is routed with the export's own router; each expert is
   calibrated on the first `per_expert` prompts routed to it (topped up with the prompts it scores highest
   when fewer reach it; `aptp quantize` defaults both pools to the toy world's captions for the toy model).
   Those prompts are denoised with the fp32 expert (the export's scheduler, `steps`,
   `guidance`), and the UNet's inputs at every step are the calibration set: every timestep the sampler
   visits, each call a classifier-free-guidance pair [uncond; cond], as post-training quantization papers
   for diffusion models do (Q-Diffusion, PTQ4DM). `random_calibration` draws the prompts at random from the
   pool instead (the ablation docs/quantization.md reports).
2. **NNCF post-training quantization** of the expert's ONNX graph read by OpenVINO (int8 weights and
   activations, `ModelType.TRANSFORMER`: NNCF's scheme for attention blocks), saved as OpenVINO IR.
3. **Quality guard**: held-out prompts routed to the expert (the toy world's held-out captions, or the
   lines of `--guard-prompts FILE`) are generated end to end with the fp32 and the int8 expert from the same
   noise; the int8 IR is kept when the images' PSNR against fp32 is >= `min_psnr` for every image and >=
   `mean_psnr` on average. Otherwise a **sensitivity scan** measures, for each group of layers (time
   embedding, first and last convolution, attention scores, cross-attention keys/values, resamplers,
   feed-forward, the outermost blocks), how much keeping it in fp32 lowers the UNet-output error on
   held-out calibration calls; groups are kept in fp32 in that order until the guard passes. If no mix
   passes, weights-only int8 is tried, then the expert stays fp32; the manifest and the report say which
   and why.

Router, text encoder and VAE decoder stay fp32: they run once per image against `2 x steps` UNet calls,
and their measured share of a generation is in the report (`other_parts`).

The output is a complete export directory: every file of the input (so `--provider cpu` still runs it in
fp32) plus `experts/expert_NN.int8.xml/.bin`, with manifest format 4 recording each IR's sha256, precision,
calibration and guard figures, and the openvino / nncf versions. `Runtime.load(out)` runs the IRs on
OpenVINO by default. Needs `openvino` and `nncf` (`pip install -e ".[quantize]"`), not torch.
"""

from __future__ import annotations

from engines.install import install_hint
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from engines import Runtime
from engines.denoise import denoise, initial_noise
from engines.errors import UserError
from engines.backends.openvino import OvSession
from engines.fileio import write_json, write_text
from engines.images import psnr
from engines.manifest import MANIFEST_NAME, FileRef, Manifest, OpenVINOInfo
from engines.request import GenerationParams

# Layer groups the sensitivity scan can keep in fp32 (regular expressions on OpenVINO node names, which
# are the ONNX node names of diffusers' module paths).
LAYER_GROUPS: dict[str, str] = {
    "time_embedding": r".*(time_embedding|time_emb_proj|add_embedding).*",
    "conv_in": r".*/conv_in/.*",
    "conv_out": r".*/conv_out/.*",
    "attention_scores": r".*/attn[12]/MatMul(_1)?$",
    "cross_attention_kv": r".*/attn2/to_[kv]/.*",
    "resamplers": r".*/(downsamplers|upsamplers)\.\d+/.*",
    "feed_forward": r".*/ff/net\..*",
    "outer_blocks": r".*/(down_blocks\.0|up_blocks\.\d+_LAST)/.*",  # _LAST filled in per graph
}


@dataclass
class QuantizeOptions:
    """Settings of `quantize_export` (each is an `aptp quantize` flag)."""

    prompts: list[str] | None = None        # calibration pool (training captions), required
    guard_prompts: list[str] | None = None  # guard pool (held-out captions), required
    per_expert: int = 16                    # calibration prompts per expert
    guard_per_expert: int = 8               # guard images per expert
    steps: int = 25
    guidance: float = 7.5
    scheduler: str | None = None            # None = the export's
    min_psnr: float = 30.0                  # guard: every image >= this (dB, against fp32)
    mean_psnr: float = 35.0                 # guard: mean >= this
    random_calibration: bool = False        # ablation: calibrate on random pool prompts, not routed ones
    experts: list[int] | None = None        # None = every expert
    threads: int = 0
    seed: int = 0
    progress: bool = True
    scan: bool = True                       # sensitivity scan when plain int8 fails the guard
    max_scan_steps: int = 5                 # most groups added to the fp32 set before weights-only
    scan_calls: int = 8                     # calibration calls per quantization inside the scan
    fp32_groups: list[str] | None = None    # keep these LAYER_GROUPS in fp32 from the first try (no scan)
    rescan: bool = False                    # scan every expert (default: the first that needs it; the
                                            # others follow its order, their guard still measured)


@dataclass
class ExpertResult:
    id: int
    precision: str
    psnr_min: float | None = None
    psnr_mean: float | None = None
    fp32_groups: list[str] = field(default_factory=list)
    tried: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0


def _import_nncf():
    try:
        import nncf
    except ImportError as e:
        raise UserError(f'aptp quantize needs nncf and openvino: {install_hint("quantize")}') from e
    import logging

    nncf.set_log_level(logging.ERROR)  # one INFO line per ignored node otherwise
    return nncf


class _Recorder:
    """A Session that records every call's inputs (the calibration set) and runs the wrapped session."""

    max_batch = None

    def __init__(self, inner):
        self.inner = inner
        self.input_names = inner.input_names
        self.output_names = inner.output_names
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, feeds):
        self.calls.append({k: np.array(v, copy=True) for k, v in feeds.items() if k in self.input_names})
        return self.inner.run(feeds)


def own_prompts(rt: Runtime, pool: list[str], k: int, n: int, random_pick: bool, seed: int) -> list[str]:
    """`n` prompts of `pool` for expert `k`: the first ones routed to it, topped up with the ones it scores
    highest; or `n` random ones (`random_pick`)."""
    if random_pick:
        rng = np.random.default_rng([seed, k])
        return [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]
    routed = rt.route_scores(pool)
    scores, ids = routed.scores, np.asarray(routed.expert_ids)
    picked = [i for i in range(len(pool)) if ids[i] == k][:n]
    if len(picked) < n:
        rest = [i for i in np.argsort(-scores[:, k]) if ids[i] != k]
        picked += rest[:n - len(picked)]
    return [pool[i] for i in picked]


class _Sampler:
    """Denoise prompts with a given UNet session (the export's scheduler and noise contract)."""

    def __init__(self, rt: Runtime, opts: QuantizeOptions):
        self.rt, self.opts = rt, opts
        m = rt.manifest
        self.sched = opts.scheduler or m.scheduler.name
        self.shape = (m.in_channels, *m.sample_size)

    def latents(self, unet, prompts: list[str], seed0: int) -> np.ndarray:
        params = GenerationParams(self.opts.steps, self.opts.guidance, 0.0, seed0, self.sched)
        out = []
        cond, uncond = self.rt.condition(prompts), self.rt.uncond()
        for j in range(0, len(prompts), 8):
            idx = list(range(j, min(j + 8, len(prompts))))
            noise = initial_noise([seed0 + i for i in idx], self.shape)
            sched = self.rt.new_scheduler(self.sched)  # with the export's mu (SD3, dynamic shifting)
            out.append(denoise(unet, sched, noise, cond.take(idx), uncond, params))
        return np.concatenate(out)

    def images(self, unet, prompts: list[str], seed0: int) -> list[np.ndarray]:
        return [np.asarray(im) for im in self.rt.decode(self.latents(unet, prompts, seed0))]


def _node_groups(model) -> dict[str, list[str]]:
    """Group name -> names of the quantizable nodes (Convolution, MatMul) it covers in this graph."""
    names = [op.get_friendly_name() for op in model.get_ordered_ops()
             if op.get_type_name() in ("Convolution", "MatMul")]
    ups = sorted({int(m.group(1)) for n in names if (m := re.search(r"/up_blocks\.(\d+)/", n))})
    groups = {}
    for g, pattern in LAYER_GROUPS.items():
        if g == "outer_blocks":
            last = ups[-1] if ups else -1
            pattern = rf".*/(down_blocks\.0|up_blocks\.{last})/.*"
        rx = re.compile(pattern)
        hit = [n for n in names if rx.match(n)]
        if hit:
            groups[g] = hit
    return groups


def _quantize(nncf, model, calls: list[dict], ignored: list[str]):
    scope = nncf.IgnoredScope(names=ignored, validate=False) if ignored else None
    return nncf.quantize(model.clone(), nncf.Dataset(calls), subset_size=len(calls),
                         model_type=nncf.ModelType.TRANSFORMER, ignored_scope=scope)


def _session(model, threads: int) -> OvSession:
    """An in-memory candidate compiled as the runtime would run it (f32 for its non-int8 layers)."""
    return OvSession(None, threads=threads, precision="f32", model=model)


def _output_error(session, reference, calls: list[dict]) -> float:
    """Mean squared UNet-output error of `session` against `reference` over `calls`."""
    errs = [float(np.mean((session.run(c)["out_sample"] - reference.run(c)["out_sample"]) ** 2)) for c in calls]
    return float(np.mean(errs))


def _guard(sampler: _Sampler, session, ref_images: list[np.ndarray], prompts: list[str], seed: int) -> tuple[float, float]:
    got = sampler.images(session, prompts, seed)
    values = [min(psnr(a, b), 99.0) for a, b in zip(ref_images, got, strict=True)]
    return float(min(values)), float(np.mean(values))


def sensitivity(nncf, model, groups: dict[str, list[str]], calib_calls: list[dict], scan_calls: list[dict],
                reference, threads: int) -> dict[str, float]:
    """Per layer group: the fraction of the int8 graph's UNet-output error (MSE against fp32 on held-out
    calls) that keeping the group in fp32 removes."""
    base = _output_error(_session(_quantize(nncf, model, calib_calls, []), threads), reference,
                         scan_calls)
    out = {}
    for g, nodes in groups.items():
        q = _quantize(nncf, model, calib_calls, nodes)
        err = _output_error(_session(q, threads), reference, scan_calls)
        out[g] = (base - err) / base if base > 0 else 0.0
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def quantize_expert(rt: Runtime, k: int, calib: list[str], guard: list[str], opts: QuantizeOptions,
                    sampler: _Sampler, log=print, order: list[str] | None = None):
    """(ExpertResult, quantized OpenVINO model or None) for expert `k`. `order`: the fp32 groups to try, in
    order, from an earlier expert's scan (None = scan this expert when plain int8 fails)."""
    nncf = _import_nncf()
    from engines.backends.openvino import core

    t0 = time.perf_counter()
    fp32 = rt.unet(k)
    rec = _Recorder(fp32)
    sampler.latents(rec, calib, opts.seed)
    calls = rec.calls
    half = max(1, len(calls) // 8)  # every 8th call held out for the sensitivity scan
    scan_calls, calib_calls = calls[::8][:half], [c for i, c in enumerate(calls) if i % 8 or len(calls) < 8]
    res = ExpertResult(id=k, precision="fp32", calibration={
        "prompts": len(calib), "unet_calls": len(calib_calls), "samples": int(sum(len(c["sample"]) for c in calib_calls)),
        "steps": opts.steps, "guidance": opts.guidance, "scheduler": sampler.sched,
        "source": "random pool prompts" if opts.random_calibration else "prompts routed to this expert"})
    ref_images = sampler.images(fp32, guard, opts.seed + 10_000)
    onnx_path = rt.export_dir / rt.manifest.expert(k).files["onnx"].path
    model = core().read_model(str(onnx_path))
    groups = _node_groups(model)

    def attempt(label: str, qmodel, fp32_groups: list[str]):
        s = _session(qmodel, opts.threads)
        lo, mean = _guard(sampler, s, ref_images, guard, opts.seed + 10_000)
        ok = lo >= opts.min_psnr and mean >= opts.mean_psnr
        res.tried.append({"candidate": label, "fp32_groups": list(fp32_groups), "psnr_min": round(lo, 2),
                          "psnr_mean": round(mean, 2), "passed": ok})
        log(f"  expert {k:02d} {label}: PSNR min {lo:.1f} / mean {mean:.1f} dB -> {'kept' if ok else 'refused'}")
        return ok, lo, mean

    chosen, keep = None, list(opts.fp32_groups or [])
    unknown = [g for g in keep if g not in LAYER_GROUPS]
    if unknown:
        raise UserError(f"unknown layer group(s) {', '.join(unknown)} (known: {', '.join(LAYER_GROUPS)})")
    q = _quantize(nncf, model, calib_calls, [n for g in keep for n in groups.get(g, [])])
    ok, lo, mean = attempt("int8" + (" + fp32 " + ", ".join(keep) if keep else ""), q, keep)
    if ok:
        chosen = ("int8", q, lo, mean)
    elif opts.scan and groups:
        if keep:  # the given groups were not enough: scan the others, tried after them
            groups_left = {g: n for g, n in groups.items() if g not in keep}
        else:
            groups_left = groups
        if order is None:
            step = max(1, len(calib_calls) // opts.scan_calls)
            sens = sensitivity(nncf, model, groups_left, calib_calls[::step][:opts.scan_calls], scan_calls, fp32,
                               opts.threads)
            res.calibration["sensitivity"] = sens  # fraction of the int8 output error each group removes
            order = [g for g, v in sens.items() if v > 0]
            log(f"  expert {k:02d} sensitivity: " + ", ".join(f"{g} {100 * v:.0f} %" for g, v in sens.items()))
        else:
            res.calibration["sensitivity_order_from_earlier_expert"] = list(order)
        res.calibration["scan_order"] = list(order)
        for g in [g for g in order if g in groups and g not in keep][:opts.max_scan_steps]:
            keep.append(g)
            q = _quantize(nncf, model, calib_calls, [n for x in keep for n in groups.get(x, [])])
            ok, lo, mean = attempt("int8 + fp32 " + ", ".join(keep), q, keep)
            if ok:
                chosen = ("int8", q, lo, mean)
                break
    if chosen is None:
        qw = nncf.compress_weights(model.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM)
        ok, lo, mean = attempt("int8 weights only", qw, [])
        if ok:
            chosen, keep = ("int8_weights", qw, lo, mean), []
    if chosen is None:
        res.reason = (f"no int8 variant met the guard (every image >= {opts.min_psnr} dB and mean >= "
                      f"{opts.mean_psnr} dB against fp32); the expert stays fp32")
        res.seconds = time.perf_counter() - t0
        return res, None
    res.precision, qmodel, res.psnr_min, res.psnr_mean = chosen
    res.fp32_groups = list(keep) if chosen[0] == "int8" else []
    res.reason = "passed the guard" + (f" with {', '.join(res.fp32_groups)} in fp32" if res.fp32_groups else "")
    res.seconds = time.perf_counter() - t0
    return res, qmodel


def _other_parts_share(rt: Runtime, prompts: list[str], opts: QuantizeOptions, sampler: _Sampler) -> dict:
    """Measured time of router + text encoder (+ VAE decoder) vs the UNet calls of one generation."""
    p = prompts[:4]
    t = time.perf_counter()
    rt.route(p)
    cond = rt.condition(p)
    t_text = time.perf_counter() - t
    unet = rt.unet(0)
    t = time.perf_counter()
    lat = sampler.latents(unet, p, 0)
    t_unet = time.perf_counter() - t
    t = time.perf_counter()
    rt.decode(lat)
    t_dec = time.perf_counter() - t
    del cond
    total = t_text + t_unet + t_dec
    return {"router_and_text_s": t_text, "unet_s": t_unet, "decode_s": t_dec,
            "share_not_unet": (t_text + t_dec) / total if total else 0.0, "prompts": len(p),
            "decision": "kept fp32: their share of a generation is below what int8 could save"}


def _versions() -> dict:
    out = {}
    for d in ("openvino", "nncf", "onnxruntime"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    return out


def quantize_export(export_dir, out_dir, opts: QuantizeOptions | None = None, log=print) -> dict:
    """Write `out_dir`: `export_dir` with an int8 OpenVINO IR per expert (module doc). Returns the report."""
    opts = opts or QuantizeOptions()
    _import_nncf()
    import openvino as ov

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if out_dir.resolve() == export_dir.resolve():
        raise UserError("--out must differ from --export (the fp32 export is the reference and stays as it is)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty")
    rt = Runtime.load(export_dir, provider="cpu", threads=opts.threads)
    if any("openvino" in e.files for e in rt.manifest.experts):
        raise UserError(f"{export_dir}: already quantized (its experts have OpenVINO IR files)")
    pool, guard_pool = opts.prompts, opts.guard_prompts
    if not pool or not guard_pool:
        raise UserError("quantizing needs calibration prompts (your training captions) and held-out guard prompts: "
                        "--prompts FILE and --guard-prompts FILE (the toy model has defaults)")
    sampler = _Sampler(rt, opts)
    experts = opts.experts if opts.experts is not None else list(range(len(rt.manifest.experts)))
    bad = [k for k in experts if not 0 <= k < len(rt.manifest.experts)]
    if bad or len(set(experts)) != len(experts):
        raise UserError(f"experts {experts}: ids must be distinct, in 0..{len(rt.manifest.experts) - 1}")
    t0 = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))  # renamed into place at the end
    try:
        for ref in rt.manifest.all_files():
            dst = tmp / ref.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(export_dir / ref.path, dst)
        for extra in ("specs.json",):
            if (export_dir / extra).is_file():
                shutil.copy2(export_dir / extra, tmp / extra)
        results, new_experts, order = [], list(rt.manifest.experts), None
        for k in experts:
            calib = own_prompts(rt, pool, k, opts.per_expert, opts.random_calibration, opts.seed)
            guard = own_prompts(rt, guard_pool, k, opts.guard_per_expert, False, opts.seed)
            log(f"expert {k:02d}: calibrating on {len(calib)} prompts x {opts.steps} steps, guard on {len(guard)}")
            res, qmodel = quantize_expert(rt, k, calib, guard, opts, sampler, log, None if opts.rescan else order)
            order = res.calibration.get("scan_order", order)
            results.append(res)
            info = dataclasses.asdict(res)
            info.pop("id")
            e = new_experts[k]
            files = dict(e.files)
            if qmodel is not None:
                rel = f"experts/expert_{k:02d}.{res.precision.replace('_', '-')}.xml"
                ov.save_model(qmodel, str(tmp / rel), compress_to_fp16=False)
                files["openvino"] = FileRef.of(tmp, rel)
                files["openvino_bin"] = FileRef.of(tmp, rel[:-4] + ".bin")
            new_experts[k] = dataclasses.replace(e, files=files, quantization=_round(info))
        versions = _versions()
        other = _other_parts_share(rt, guard_pool, opts, sampler)
        m = rt.manifest
        info = dict(m.info)
        info["quantize"] = {"source": str(export_dir), "options": _options_record(opts), "versions": versions,
                            "other_parts": other, "seconds": time.perf_counter() - t0}
        new = dataclasses.replace(m, experts=new_experts, info=info, format_version=4,
                                  openvino=OpenVINOInfo(versions["openvino"] or "?", versions["nncf"] or "?"))
        Manifest.from_dict(json.loads(json.dumps(new.to_dict())))  # what we write must read back
        write_json(tmp / MANIFEST_NAME, new.to_dict())
        report = {"export": str(export_dir), "out": str(out_dir), "experts": [_round(dataclasses.asdict(r)) for r in results],
                  "other_parts": other, "versions": versions, "options": _options_record(opts),
                  "seconds": time.perf_counter() - t0}
        write_json(tmp / "quantize_report.json", report)
        write_text(tmp / "quantize_report.md", report_markdown(report))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700: readable by others as an export must be
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _round(d):
    if isinstance(d, float):
        return round(d, 4) if math.isfinite(d) else d
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_round(v) for v in d]
    return d


def _options_record(opts: QuantizeOptions) -> dict:
    d = dataclasses.asdict(opts)
    for k in ("prompts", "guard_prompts"):
        d[k] = None if d[k] is None else f"{len(d[k])} prompts"
    return d


def report_markdown(report: dict) -> str:
    lines = ["# aptp quantize", "", f"From `{Path(report['export']).name}`; openvino {report['versions']['openvino']}, "
             f"nncf {report['versions']['nncf']}; {report['seconds']:.0f} s.", "",
             "Guard: end-to-end images of held-out prompts routed to each expert, int8 vs fp32 from the same noise.", "",
             "| expert | precision | PSNR min / mean (dB) | kept in fp32 | calibration | why |", "|---|---|---|---|---|---|"]
    for e in report["experts"]:
        c = e["calibration"]
        ps = "-" if e["psnr_min"] is None else f"{e['psnr_min']:.1f} / {e['psnr_mean']:.1f}"
        lines.append(f"| {e['id']} | {e['precision']} | {ps} | {', '.join(e['fp32_groups']) or '-'} | "
                     f"{c['prompts']} prompts, {c['unet_calls']} calls ({c['samples']} samples) | {e['reason']} |")
    o = report["other_parts"]
    lines += ["", f"Router + text encoder + decoder: {100 * o['share_not_unet']:.1f} % of a {report['options']['steps']}-step "
              f"generation of {o['prompts']} prompts ({o['decision']})."]
    return "\n".join(lines) + "\n"
