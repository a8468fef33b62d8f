"""`aptp doctor`: what this machine can run, in the form users paste into a bug report. No torch.

    report = collect("export/NAME")     # dict, JSON-ready
    print(format_report(report))

Versions come from the installed distributions' metadata (`importlib.metadata`: torch is never
imported). onnxruntime's providers are listed twice: *available* (what the wheel was built with,
`get_available_providers()`) and *working* (a one-node session created with each one really got
it, `get_providers()`): onnxruntime-gpu lists CUDA even where no GPU or no CUDA/cuDNN library is
found, then runs on the CPU. With an export directory, the manifest's TensorRT plans are compared
with this machine (TensorRT version, GPU, compute capability).
"""

from __future__ import annotations

from ..install import install_hint
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from .cuda import device_info, distribution_version, plan_environment, plan_mismatch, tensorrt_version
from ..errors import EngineError
from ..machine import cpu_info
from ..manifest import read_manifest
from .openvino import INSTALL_HINT as OV_HINT
from .openvino import core, openvino_version
from .ort import CUDA_EP, import_ort, cuda_unavailable_reason, ort_flavour, probe_provider

_ORT_NAMES = {"CPUExecutionProvider": "cpu", CUDA_EP: "cuda"}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _versions() -> dict:
    try:
        aptp = metadata.version("aptp")
    except metadata.PackageNotFoundError:
        aptp = "not installed (running from a checkout)"
    return {
        "aptp": aptp,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": distribution_version("torch"),
        "onnxruntime": ort_flavour(),
        "openvino": distribution_version("openvino"),
        "nncf": distribution_version("nncf"),
        "tensorrt": distribution_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"),
        "cuda-python": distribution_version("cuda-python"),
        "cuda-bindings": distribution_version("cuda-bindings"),
    }


def _cpu() -> dict:
    """Model and the ISA flags that decide kernels (float32 rounding and speed differ with them);
    the full flag string is in `aptp doctor --json`."""
    info = cpu_info()
    return {"model": info["model"], "vendor": info["vendor"], "cores": info["cores"], "isa": info["isa"],
            "flags": info["flags"]}


def _onnxruntime() -> dict:
    try:
        ort = import_ort()
    except EngineError as e:
        return {"error": _one_line(e)}
    available = list(ort.get_available_providers())
    working, errors = {}, {}
    for name, short in _ORT_NAMES.items():
        if name not in available:
            continue
        try:
            got = probe_provider(short)
        except Exception as e:  # noqa: BLE001 - any failure is what the report is for
            errors[short] = _one_line(e)
            continue
        working[short] = name in got
        if name not in got:
            errors[short] = f"a session created with {name} got {', '.join(got)}"
    out = {"available": available, "working": [k for k, v in working.items() if v]}
    cuda_reason = cuda_unavailable_reason() if "cuda" not in out["working"] else None
    if errors:
        out["errors"] = errors
    if cuda_reason:
        out["cuda"] = cuda_reason
    return out


def _driver_version() -> str | None:
    """The NVIDIA kernel driver's version (Linux: /proc/driver/nvidia/version), or None."""
    try:
        first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    words = [w for w in first.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else first.strip()


def _gpu() -> dict:
    driver = {"driver": _driver_version()}
    if distribution_version("cuda-python", "cuda-bindings") is None:
        return {**driver, "error": f'cuda-python is not installed ({install_hint("tensorrt")}): the GPU is '
                                   "queried through it"}
    try:
        return {**driver, **device_info().to_dict()}
    except EngineError as e:
        return {**driver, "error": _one_line(e)}


def _openvino() -> dict:
    """OpenVINO's CPU device and what its kernels can use here: int8 (VNNI / AMX-INT8) and bf16 (AVX512_BF16
    / AMX-BF16; OpenVINO would run fp32 layers in bf16 on such CPUs unless told f32, which the runtime does;
    APTP_OPENVINO_PRECISION=bf16 opts in)."""
    version = openvino_version()
    if version is None:
        return {"error": f"not installed: {OV_HINT}"}
    try:
        c = core()
        devices = list(c.available_devices)
        caps = list(c.get_property("CPU", "OPTIMIZATION_CAPABILITIES")) if "CPU" in devices else []
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
        return {"version": version, "error": _one_line(e)}
    out = {"version": version, "devices": devices, "cpu_capabilities": caps}
    if "CPU" not in devices:
        out["error"] = "no CPU device"
    return out


def _tensorrt() -> dict:
    version = tensorrt_version()
    if version is None:
        return {"error": f'not installed: {install_hint("tensorrt")}'}
    try:
        env = plan_environment()
    except EngineError as e:
        return {"version": version, "error": _one_line(e)}
    return env


def _export(export_dir: str | os.PathLike) -> dict:
    """The export's manifest against this machine."""
    out: dict = {"path": str(Path(export_dir).resolve())}
    try:
        m = read_manifest(export_dir)
    except EngineError as e:
        out["error"] = _one_line(e)
        return out
    plans = [f"expert {e.id}" for e in m.experts if "tensorrt" in e.files]
    if m.dense is not None and "tensorrt" in m.dense.files:
        plans.append("dense")
    out.update({"format_version": m.format_version, "precision": m.precision, "experts": len(m.experts),
                "created_by": m.created_by, "plans": plans})
    irs = {f"expert {e.id}": e.precision for e in m.experts if "openvino" in e.files}
    if irs:
        out["openvino_ir"] = irs
        out["openvino_written_with"] = m.openvino.to_dict() if m.openvino else None
    if not plans:
        out["plans_match"] = None
        out["note"] = "no TensorRT plans (ONNX only): providers cpu and cuda"
        return out
    if m.tensorrt is None:
        out["plans_match"] = None
        out["note"] = ("the manifest (format version 1) does not record where its plans were built: "
                       "they are checked only when first opened")
        return out
    out["plans_built_with"] = m.tensorrt.to_dict()
    try:
        here = plan_environment()
    except EngineError as e:
        out["plans_match"] = False
        out["error"] = f"cannot run the plans here: {_one_line(e)}"
        return out
    error, warning = plan_mismatch(m.tensorrt.to_dict(), here)
    out["plans_match"] = error is None
    if error or warning:
        out["error" if error else "warning"] = error or warning
    return out


def collect(export_dir: str | os.PathLike | None = None) -> dict:
    """Everything `aptp doctor` prints, as a JSON-ready dict (sections: versions, onnxruntime, gpu,
    tensorrt, and export when `export_dir` is given). Never raises for a missing package or GPU: the
    section says so."""
    report = {"versions": _versions(), "cpu": _cpu(), "onnxruntime": _onnxruntime(), "openvino": _openvino(),
              "gpu": _gpu(), "tensorrt": _tensorrt()}
    if export_dir is not None:
        report["export"] = _export(export_dir)
    report["providers"] = usable_providers(report)
    return report


def usable_providers(report: dict) -> list[str]:
    """The runtime providers that work here according to `report`."""
    working = report["onnxruntime"].get("working", [])
    out = [p for p in ("cpu", "cuda") if p in working]
    if "error" not in report["tensorrt"] and "error" not in report["gpu"]:
        out.append("tensorrt")
    if "error" not in report.get("openvino", {"error": ""}) and "cpu" in working:
        out.append("openvino")
    return out


def format_report(report: dict) -> str:
    """The report as aligned `key: value` lines, one section per block."""
    lines = []
    for section, body in report.items():
        if section == "providers":
            lines.append(f"usable providers: {', '.join(body) or 'none'}")
            continue
        lines.append(f"{section}:")
        for k, v in body.items():
            if section == "cpu" and k == "flags":
                continue  # hundreds of words; `--json` has them, `isa` names those that pick kernels
            if isinstance(v, dict):
                v = "; ".join(f"{a}: {b}" for a, b in v.items())
            elif isinstance(v, list):
                v = ", ".join(map(str, v)) or "none"
            elif v is None:
                v = "-"
            lines.append(f"  {k:20s} {v}")
    return "\n".join(lines)
