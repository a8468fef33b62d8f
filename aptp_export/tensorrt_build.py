"""Build a TensorRT engine (plan) from an exported ONNX graph and its ExportSpec.

    from aptp_export.tensorrt_build import build_engine
    build_engine("experts/expert_00.onnx", spec, "experts/expert_00.plan", timing_cache="timing.cache")

- Strongly typed network: precisions come from the ONNX graph itself (an fp16 export has fp16
  compute and fp32 I/O), so no builder precision flags are set.
- One optimisation profile, min/opt/max of every input from `spec.profile()` — the same spec that
  defined the ONNX graph's dynamic axes.
- A timing cache file is read if present and written back after the build, so building the next
  expert (same layer shapes, other widths) is faster.
- The plan is written atomically. Needs the `tensorrt` package and an NVIDIA GPU:
  `pip install "aptp[tensorrt]"`; without them `TensorRTUnavailable` (a UserError) says so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from engines.errors import UserError
from engines.fileio import atomic_path

from .export_spec import ExportSpec

EXTRA = 'pip install "aptp[tensorrt]"'


class TensorRTUnavailable(UserError):
    """tensorrt (or a GPU) is missing; the message names the extra to install."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine (message carries TensorRT's errors)."""


def import_tensorrt():
    """The tensorrt module, or TensorRTUnavailable naming the extra."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            f"--backend tensorrt needs the tensorrt Python package and an NVIDIA GPU: {EXTRA}"
        ) from None
    return trt


def tensorrt_available() -> bool:
    """True if tensorrt imports and a CUDA device is visible to it."""
    try:
        trt = import_tensorrt()
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        return builder is not None and getattr(builder, "platform_has_fast_fp16", None) is not None
    except Exception:
        return False


@dataclass
class BuildResult:
    plan: Path
    seconds: float
    timing_cache: Path | None
    profile: dict


def build_engine(onnx_path: str | os.PathLike, spec: ExportSpec, plan_path: str | os.PathLike, *,
                 timing_cache: str | os.PathLike | None = None, workspace_gb: float = 4.0,
                 builder_optimization_level: int = 3, verbose: bool = False) -> BuildResult:
    """Build and save a TensorRT plan for `onnx_path` with the optimisation profile of `spec`.

    Args:
        onnx_path: the exported graph (external data next to it is found by the parser).
        spec: the ExportSpec used for the export (input names and min/opt/max shapes).
        plan_path: where to write the serialized engine.
        timing_cache: optional cache file, read if it exists and rewritten after the build.
        workspace_gb: builder workspace memory limit.
        builder_optimization_level: 0-5 (TensorRT's default is 3).
    """
    trt = import_tensorrt()
    t0 = time.perf_counter()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise TensorRTUnavailable(f"TensorRT found no usable CUDA GPU ({EXTRA} on a machine with one)")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT cannot parse the graph: {errors}")

    names = [network.get_input(i).name for i in range(network.num_inputs)]
    profile_shapes = spec.profile()
    missing = [n for n in names if n not in profile_shapes]
    if missing:
        raise EngineBuildError(f"{onnx_path}: inputs {missing} are not in the export spec {spec.name!r}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = builder_optimization_level
    profile = builder.create_optimization_profile()
    for name in names:
        lo, opt, hi = profile_shapes[name]
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT failed to build an engine (see the log above)")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return BuildResult(plan=plan_path, seconds=time.perf_counter() - t0, timing_cache=cache_path,
                       profile={k: [list(s) for s in v] for k, v in profile_shapes.items()})
