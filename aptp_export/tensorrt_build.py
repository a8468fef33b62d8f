"""Build a TensorRT engine (plan) from an exported ONNX graph and its ExportSpec.

    from aptp_export.tensorrt_build import build_engine
    build_engine("experts/expert_00.onnx", spec, "experts/expert_00.plan", timing_cache="/tmp/timing.cache")

- Strongly typed network: precisions come from the ONNX graph itself (an fp16 export has fp16
  compute and fp32 I/O), so no builder precision flags are set. TensorRT 11 is always strongly
  typed (the flag is deprecated there and not passed).
- fp32 means fp32: TensorRT lets fp32 convolutions and matmuls use TF32 by default
  (`BuilderFlag.TF32`); the flag is cleared unless `allow_tf32=True`.
- One optimisation profile, min/opt/max of every input from `spec.profile()` — the same spec that
  defined the ONNX graph's dynamic axes (the UNet's opt batch is the runtime's default call).
- No workspace cap by default (TensorRT's default is the GPU's memory): a cap can exclude the
  fastest tactics. `workspace_gb` sets one.
- A timing cache file is read if present and written back after the build, so building the next
  expert (same layer shapes, other widths) is faster. A cache TensorRT refuses (another GPU or
  version) is replaced by an empty one; a cache that cannot be serialised is not written.
- The plan is written atomically. Needs the `tensorrt` package and an NVIDIA GPU:
  `pip install -e ".[tensorrt]"`; without them `TensorRTUnavailable` (a BackendError, so a
  UserError) says so.
"""

from __future__ import annotations

from engines.install import install_hint
import os
import time
from dataclasses import dataclass
from pathlib import Path

from engines.backends.cuda import device_info
from engines.errors import BackendError
from engines.fileio import atomic_path

from .export_spec import ExportSpec

EXTRA = install_hint("tensorrt")


class TensorRTUnavailable(BackendError):
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


def new_builder(trt, logger):
    """trt.Builder, or TensorRTUnavailable: the binding raises TypeError (it does not return None) when
    CUDA cannot be initialised (no GPU, driver too old for this TensorRT)."""
    try:
        builder = trt.Builder(logger)
    except TypeError as e:
        raise TensorRTUnavailable(f"TensorRT could not start on a CUDA GPU ({str(e).strip()[:200]}); "
                                  f"{EXTRA} on a machine with one, and see `aptp doctor`") from None
    if builder is None:  # older bindings
        raise TensorRTUnavailable(f"TensorRT could not start on a CUDA GPU ({EXTRA} on a machine with one)")
    return builder


def tensorrt_available() -> bool:
    """True if tensorrt imports, a CUDA GPU is visible and a TensorRT builder can be created on it."""
    try:
        trt = import_tensorrt()
        device_info()
        new_builder(trt, trt.Logger(trt.Logger.ERROR))
    except (BackendError, ImportError, OSError):
        return False
    return True


@dataclass
class BuildResult:
    plan: Path
    seconds: float
    timing_cache: Path | None
    profile: dict
    notes: tuple[str, ...] = ()


def _network_flags(trt) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None or int(trt.__version__.split(".")[0]) >= 11:  # always strongly typed in 11
        return 0
    return 1 << int(flag)


def _set_timing_cache(config, cache_bytes: bytes, notes: list[str]) -> None:
    cache = config.create_timing_cache(cache_bytes)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return
    notes.append("timing cache from another GPU or TensorRT version ignored")
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise EngineBuildError("TensorRT refused an empty timing cache")


def build_engine(onnx_path: str | os.PathLike, spec: ExportSpec, plan_path: str | os.PathLike, *,
                 timing_cache: str | os.PathLike | None = None, workspace_gb: float | None = None,
                 builder_optimization_level: int = 3, allow_tf32: bool = False,
                 verbose: bool = False) -> BuildResult:
    """Build and save a TensorRT plan for `onnx_path` with the optimisation profile of `spec`.

    Args:
        onnx_path: the exported graph (external data next to it is found by the parser).
        spec: the ExportSpec used for the export (input names and min/opt/max shapes).
        plan_path: where to write the serialized engine.
        timing_cache: optional cache file, read if it exists and rewritten after the build.
        workspace_gb: builder workspace memory limit in GiB (None: TensorRT's default, the GPU's memory).
        builder_optimization_level: 0-5 (TensorRT's default is 3).
        allow_tf32: let fp32 layers use TF32 (off: an fp32 plan computes in fp32).
    """
    trt = import_tensorrt()
    t0 = time.perf_counter()
    notes: list[str] = []
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = new_builder(trt, logger)
    network = builder.create_network(_network_flags(trt))
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
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = builder_optimization_level
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and not allow_tf32:
        config.clear_flag(tf32)
    profile = builder.create_optimization_profile()
    for name in names:
        lo, opt, hi = profile_shapes[name]
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    _set_timing_cache(config, cache_bytes, notes)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT failed to build an engine (see the log above)")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_path is not None:
        cache = config.get_timing_cache()
        data = cache.serialize() if cache is not None else None
        if data is None:
            notes.append("TensorRT returned no timing cache; none written")
            cache_path = None
        else:
            with atomic_path(cache_path) as tmp:
                tmp.write_bytes(bytes(data))
    return BuildResult(plan=plan_path, seconds=time.perf_counter() - t0, timing_cache=cache_path,
                       profile={k: [list(s) for s in v] for k, v in profile_shapes.items()}, notes=tuple(notes))
