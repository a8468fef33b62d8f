"""The GPU proof: one command that checks the whole GPU path on a machine with one NVIDIA GPU.

    python -m benchmarks.gpu_proof --run aptp-demo/run --out gpu-proof     # after `aptp demo`

Needs the GPU install (docs/gpu.md: onnxruntime-gpu alone, tensorrt, cuda-python) and the demo's
finished training run (`aptp demo --out aptp-demo`, CPU minutes, or a copy of its `run/`). In
under 8 minutes on the toy model it:

1. prints `aptp doctor` (versions, GPU, compute capability, available *and working* providers);
   onnxruntime must really run on CUDA and TensorRT must start;
2. runs the TensorRT / CUDA tests (`-m tensorrt`): they must pass, none may skip;
3. exports the run with `--backend tensorrt` twice: fp32 and fp16 (every expert and the dense model
   get a plan; the manifest records TensorRT version, GPU and compute capability);
4. generates 8 prompts with providers cpu, cuda and tensorrt (fp32 and fp16 plans): routing must
   be identical to cpu; PSNR against the cpu images >= 40 dB for cuda, >= 35 dB for tensorrt;
5. times every expert and the dense model at UNet batch 2 and 16: TensorRT with CUDA events on
   resident buffers, onnxruntime-cuda with I/O binding (benchmarks.unet_latency);
6. writes OUT/gpu_proof.json and OUT/latency_vs_macs.png, prints a pass/fail table and exits 0
   only if every check passed (1 otherwise; 2 at once when no GPU is usable here).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from engines import Runtime
from engines.backends.cuda import device_info
from engines.backends.doctor import collect, format_report
from engines.errors import EngineError, UserError
from engines.images import psnr
from engines.fileio import write_json
from training.export_run import export_run
from training.rundir import RunDir

from .engines_bench import default_prompts, models_from_export
from .plots import latency_vs_macs
from .unet_latency import bench_unets

PSNR_MIN_DB = {"cuda": 40.0, "tensorrt": 35.0}  # against the cpu images of the same export
TIME_BUDGET_S = 8 * 60
GPU_TESTS = ("tests/aptp_export/test_onnx_tensorrt.py", "tests/engines/test_engines_gpu.py")
ROOT = Path(__file__).resolve().parents[1]



class Checks:
    """The pass/fail table."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}  {detail}", flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r["ok"] for r in self.rows)

    def table(self) -> str:
        width = max(len(r["check"]) for r in self.rows)
        return "\n".join(f"{'PASS' if r['ok'] else 'FAIL'}  {r['check']:{width}s}  {r['detail']}" for r in self.rows)


def run_gpu_tests(out: Path) -> dict:
    """Run the TensorRT/CUDA tests in a subprocess; counts from its JUnit XML."""
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "tensorrt", "-rs", f"--junitxml={xml}", *GPU_TESTS]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    counts["returncode"] = proc.returncode
    counts["tail"] = proc.stdout[-2000:]
    return counts


def generate_all(exports: dict[str, Path], prompts: list[str], steps: int) -> dict:
    """Images per (label -> export, provider); label "cpu" is the reference."""
    runs = {"cpu": (exports["fp32"], "cpu"), "cuda": (exports["fp32"], "cuda"),
            "tensorrt-fp32": (exports["fp32"], "tensorrt"), "tensorrt-fp16": (exports["fp16"], "tensorrt"),
            "cpu-fp16": (exports["fp16"], "cpu")}
    out = {}
    for label, (export, provider) in runs.items():
        rt = Runtime.load(export, provider=provider)
        t = time.perf_counter()
        res = rt.generate_with_info(prompts, steps=steps, guidance_scale=7.5, seed=0)
        out[label] = {"expert_ids": res.expert_ids, "images": [np.asarray(im) for im in res.images],
                      "seconds": time.perf_counter() - t, "part_providers": rt.part_providers}
    return out


def compare(gen: dict, checks: Checks) -> dict:
    summary = {}
    for label, ref_label in (("cuda", "cpu"), ("tensorrt-fp32", "cpu"), ("tensorrt-fp16", "cpu-fp16")):
        ref, got = gen[ref_label], gen[label]
        same = got["expert_ids"] == ref["expert_ids"]
        checks.add(f"routing {label} == {ref_label}", same, f"{got['expert_ids']}")
        values = [psnr(a, b) for a, b in zip(got["images"], ref["images"], strict=True)]
        worst = min(values)
        need = PSNR_MIN_DB["cuda" if label == "cuda" else "tensorrt"]
        checks.add(f"PSNR {label} vs {ref_label} >= {need:.0f} dB", worst >= need, f"min {worst:.1f} dB")
        summary[label] = {"psnr_db_min": worst, "psnr_db": values, "routing_identical": same,
                          "seconds": got["seconds"], "part_providers": got["part_providers"]}
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_proof", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="aptp-demo/run", help="the demo's finished training run (default aptp-demo/run)")
    ap.add_argument("--out", default="gpu-proof", help="output directory (default gpu-proof)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps of the 8 images (default 20)")
    ap.add_argument("--repeats", type=int, default=20, help="timed executions per model and batch (default 20)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the GPU tests (the proof then fails)")
    args = ap.parse_args(argv)

    # 0. a GPU at all? (before anything is written or exported)
    try:
        gpu = device_info()
    except EngineError as e:
        print(f"gpu_proof: no GPU usable here, nothing done: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    run, out = RunDir(args.run), Path(args.out)
    if not run.is_finetuned():
        raise UserError(f"{args.run}: not a finished training run; train the demo first (`aptp demo --out aptp-demo`) "
                        "or pass --run")
    out.mkdir(parents=True, exist_ok=True)
    checks, result = Checks(), {"gpu": gpu.to_dict()}

    print("== 1/6 doctor ==", flush=True)
    doctor = collect()
    print(format_report(doctor), flush=True)
    result["doctor"] = doctor
    checks.add("onnxruntime runs on CUDA", "cuda" in doctor["providers"], doctor["onnxruntime"].get("cuda", ""))
    checks.add("TensorRT starts on the GPU", "tensorrt" in doctor["providers"], doctor["tensorrt"].get("error", ""))

    print("== 2/6 TensorRT / CUDA tests ==", flush=True)
    if args.skip_tests:
        checks.add("GPU tests pass, none skipped", False, "skipped by --skip-tests")
    else:
        tests = run_gpu_tests(out)
        result["tests"] = tests
        bad = tests["failures"] + tests["errors"] + tests["skipped"]
        checks.add("GPU tests pass, none skipped", tests["tests"] > 0 and bad == 0 and tests["returncode"] == 0,
                   f"{tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
                   f"{tests['skipped']} skipped")

    print("== 3/6 export with --backend tensorrt (fp32, fp16) ==", flush=True)
    exports = {}
    for precision in ("fp32", "fp16"):
        t = time.perf_counter()
        exports[precision] = out / f"export_{precision}"
        manifest, _ = export_run(run.root, exports[precision], backend="tensorrt", precision=precision,
                                 with_dense=True, progress=False)
        plans = sum("tensorrt" in e.files for e in manifest.experts)
        checks.add(f"export {precision} with TensorRT plans", plans == len(manifest.experts) and manifest.tensorrt is not None,
                   f"{plans}/{len(manifest.experts)} plans, {time.perf_counter() - t:.0f} s, built with "
                   f"{manifest.tensorrt.to_dict() if manifest.tensorrt else None}")

    print("== 4/6 generate 8 prompts with cpu, cuda, tensorrt ==", flush=True)
    prompts = default_prompts(8)
    gen = generate_all(exports, prompts, args.steps)
    result["generation"] = {"prompts": prompts, "steps": args.steps, **compare(gen, checks)}

    print("== 5/6 device-side latency at UNet batch 2 and 16 ==", flush=True)
    rows = []
    for precision, export in exports.items():
        models, shape = models_from_export(export)
        for r in bench_unets(models, shape, [1, 8], ["tensorrt", "onnxruntime-cuda"], warmup=5, repeats=args.repeats):
            rows.append({**r, "precision": precision})
    result["latency"] = rows
    got = {(r["backend"], r["precision"], r["batch"]) for r in rows}
    want = {(b, p, n) for b in ("tensorrt", "onnxruntime-cuda") for p in exports for n in (2, 16)}
    checks.add("latency of every model at UNet batch 2 and 16", want <= got and all(
        np.isfinite(r["latency_ms_median"]) and r["latency_ms_median"] > 0 for r in rows), f"{len(rows)} rows")

    print("== 6/6 report ==", flush=True)
    plot = out / "latency_vs_macs.png"
    latency_vs_macs([r for r in rows if r["precision"] == "fp32"], plot, batch=16,
                    title="UNet latency against MACs (GPU, batch 16, fp32)")
    seconds = time.perf_counter() - t0
    checks.add(f"whole proof under {TIME_BUDGET_S // 60} min", seconds < TIME_BUDGET_S, f"{seconds:.0f} s")
    result.update({"seconds": seconds, "checks": checks.rows, "passed": checks.ok})
    write_json(out / "gpu_proof.json", json.loads(json.dumps(result, default=str)))
    print("\n" + checks.table())
    print(f"\n{'PASSED' if checks.ok else 'FAILED'}: {out / 'gpu_proof.json'}, {plot}")
    return 0 if checks.ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"gpu_proof: error: {e}", file=sys.stderr)
        sys.exit(2)
