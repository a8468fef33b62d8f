"""The GPU side of this machine, without torch: the optional NVIDIA packages and what they report.

This module is the one place where `engines` imports the optional GPU extras (`tensorrt`,
`cuda-python`); a missing one raises BackendError naming the extra to install.

    info = device_info()          # DeviceInfo(name="NVIDIA H200", compute_capability="9.0", ...)
    tensorrt_version()            # "10.8.0.43" or None
    plan_environment()            # what a TensorRT plan built here depends on (recorded in the manifest)

A TensorRT plan is specific to the TensorRT version that built it and to the GPU's compute
capability (and, for best performance, the GPU model): `plan_mismatch` compares what a manifest
recorded with this machine.
"""

from __future__ import annotations

from ..install import install_hint
from dataclasses import asdict, dataclass
from importlib import metadata

from ..errors import BackendError

TENSORRT_EXTRA = f'{install_hint("tensorrt")}: tensorrt and cuda-python; needs an NVIDIA GPU'


def import_tensorrt():
    """The tensorrt module, or BackendError naming the extra to install."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(f"provider 'tensorrt' needs the tensorrt package: {TENSORRT_EXTRA}") from e
    return trt


def import_cudart():
    """cuda-python's runtime API module, or BackendError naming the extra."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 (removed in 13)
        except ImportError as e:
            raise BackendError(f"provider 'tensorrt' needs cuda-python: {TENSORRT_EXTRA}") from e
    return cudart


def native_handle(obj) -> int:
    """The integer handle of a cuda-python object (stream, event): `get_cuda_native_handle` where it
    exists (cuda-bindings >= 12.9.1 deprecates `int(obj)`), else `int(obj)`."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def cuda_check(result, what: str):
    """cuda-python calls return (error, *values); raise BackendError on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        hint = (" (the NVIDIA driver is older than this cuda-python / TensorRT build needs; see docs/gpu.md)"
                if "InsufficientDriver" in name else "")
        raise BackendError(f"CUDA error {name} in {what}{hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _version_str(v: int) -> str:
    """CUDA's integer version (12040) as "12.4"."""
    return f"{v // 1000}.{(v % 1000) // 10}"


@dataclass(frozen=True)
class DeviceInfo:
    """GPU `index` as CUDA sees it. compute_capability "major.minor"; memory in bytes; versions "12.4"."""

    index: int
    name: str
    compute_capability: str
    total_memory: int
    driver_cuda_version: str  # the highest CUDA version the installed driver supports
    runtime_cuda_version: str  # the CUDA runtime cuda-python was built against

    def to_dict(self) -> dict:
        return asdict(self)


def device_info(index: int = 0) -> DeviceInfo:
    """Name, compute capability and memory of GPU `index`; BackendError when none is usable
    (cuda-python missing, no device, driver too old)."""
    cudart = import_cudart()
    count = cuda_check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not count:
        raise BackendError("no CUDA GPU is visible (cudaGetDeviceCount() = 0)")
    if not 0 <= index < count:
        raise BackendError(f"no CUDA GPU {index} (this machine has {count})")
    props = cuda_check(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name
    name = (name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)).strip()
    driver = cuda_check(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
    runtime = cuda_check(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    return DeviceInfo(index=index, name=name, compute_capability=f"{props.major}.{props.minor}",
                      total_memory=int(props.totalGlobalMem), driver_cuda_version=_version_str(int(driver)),
                      runtime_cuda_version=_version_str(int(runtime)))


def distribution_version(*names: str) -> str | None:
    """Version of the first installed distribution among `names` (never imports it)."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def tensorrt_version() -> str | None:
    """The installed TensorRT Python package's version, or None."""
    try:
        return import_tensorrt().__version__
    except BackendError:
        return None


def plan_environment(index: int = 0) -> dict:
    """What a TensorRT plan built on this machine depends on, as recorded in the manifest's `tensorrt`:
    {"version", "gpu", "compute_capability"}."""
    info = device_info(index)
    version = tensorrt_version()
    if version is None:
        raise BackendError(f"tensorrt is not installed: {TENSORRT_EXTRA}")
    return {"version": version, "gpu": info.name, "compute_capability": info.compute_capability}


def plan_mismatch(recorded: dict, here: dict) -> tuple[str | None, str | None]:
    """(error, warning) comparing a manifest's plan environment with this machine's.

    A plan only deserializes with the TensorRT version that built it and runs only on GPUs of the
    same compute capability: either difference is an error. Another GPU model of the same compute
    capability runs the plan, with tactics tuned for the other model: a warning."""
    built = (f"TensorRT {recorded['version']} on {recorded['gpu']} (compute capability "
             f"{recorded['compute_capability']})")
    this = f"TensorRT {here['version']} on {here['gpu']} (compute capability {here['compute_capability']})"
    if recorded["version"] != here["version"] or recorded["compute_capability"] != here["compute_capability"]:
        return (f"the TensorRT plans were built with {built}; this machine has {this}: rebuild them here with "
                "`aptp export --backend tensorrt`"), None
    if recorded["gpu"] != here["gpu"]:
        return None, (f"the TensorRT plans were tuned on {recorded['gpu']}, this GPU is {here['gpu']} (same compute "
                      "capability: they run, possibly slower; rebuild for best latency)")
    return None, None
