"""onnxruntime behind the `Session` interface (engines.backends): the "cpu" and "cuda" providers.

- "cpu": onnxruntime's CPUExecutionProvider (package `onnxruntime`, extra `cpu`);
- "cuda": onnxruntime's CUDAExecutionProvider (package `onnxruntime-gpu`, extra `gpu`); the graphs
  without a TensorRT plan (router, text encoder, VAE decoder) of a "tensorrt" runtime run here too.

Nothing runs on another device than the one asked for without a word: a "cuda" session whose
onnxruntime silently fell back to the CPU (CUDA/cuDNN libraries not found, no GPU) is refused, and
`engines.backends.check_provider` finds that before any file is read by running a one-node graph
(`probe_provider`).
"""

from __future__ import annotations

from ..install import install_hint
import os
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import BackendError

_SHRINK = {"on": False, "options": None}  # see shrink_cpu_arena


def shrink_cpu_arena(enabled: bool = True) -> None:
    """Process-wide: after every run, give the CPU memory arena's unused chunks back (onnxruntime's
    "memory.enable_memory_arena_shrinkage"). Without it each session keeps the peak of the largest batch it
    ever ran (measured on the demo export, 9 experts: 360 MB after batch-1 calls, 1050 MB after batch 8,
    for good); with it, 270 MB flat at about the same speed (docs/serving.md). The server turns it on."""
    _SHRINK["on"] = bool(enabled)


def _run_options(ort):
    if not _SHRINK["on"]:
        return None
    if _SHRINK["options"] is None:  # built once: read-only during runs, shared by the worker threads
        ro = ort.RunOptions()
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        _SHRINK["options"] = ro
    return _SHRINK["options"]


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
}


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError(f'onnxruntime is not installed: {install_hint("cpu")} '
                           '(or ".[gpu]" for CUDA)') from e
    return ort


CUDA_EP = "CUDAExecutionProvider"
_GPU_EXTRA = f'{install_hint("gpu")}: onnxruntime-gpu; in a venv without torch also the nvidia-* CUDA 12 / cuDNN 9 wheels'


def _installed(dist: str) -> str | None:
    """Version of an installed distribution, or None (never imports it)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def ort_flavour() -> str:
    """Which onnxruntime distribution(s) provide the `onnxruntime` module: "onnxruntime 1.20.1",
    "onnxruntime-gpu 1.20.1", or both joined with " + " (a broken install: they share one module)."""
    found = [f"{d} {v}" for d in ("onnxruntime", "onnxruntime-gpu") if (v := _installed(d))]
    return " + ".join(found) or "none"


def _preload_cuda_libraries(ort) -> None:
    """Let onnxruntime-gpu (>= 1.21) load CUDA and cuDNN from the nvidia-* wheels or torch, so a torch-free
    venv finds them without LD_LIBRARY_PATH. Best effort: whatever it cannot load, the probe reports."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception:  # noqa: BLE001 - missing libraries are reported by the session check that follows
        pass


# A one-node ONNX model (y = Identity(x), float32 [1]), encoded by hand so that probing a provider needs
# neither the `onnx` package nor a file: ModelProto{ir_version 8, opset 13, graph{node, input, output}}.
def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_field(number: int, value) -> bytes:
    if isinstance(value, int):
        return _pb_varint(number << 3) + _pb_varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _pb_varint(number << 3 | 2) + _pb_varint(len(data)) + data


def probe_model_bytes() -> bytes:
    """Serialized ONNX model `y = Identity(x)`, x and y float32 of shape [1]."""
    dim = _pb_field(1, _pb_field(1, 1))                                  # TensorShapeProto{dim{dim_value 1}}
    tensor_type = _pb_field(1, _pb_field(1, 1) + _pb_field(2, dim))      # TypeProto{tensor_type{FLOAT, shape}}
    value = lambda name: _pb_field(1, name) + _pb_field(2, tensor_type)  # noqa: E731 - ValueInfoProto
    node = _pb_field(1, "x") + _pb_field(2, "y") + _pb_field(4, "Identity")
    graph = _pb_field(1, node) + _pb_field(2, "probe") + _pb_field(11, value("x")) + _pb_field(12, value("y"))
    return (_pb_field(1, 8) + _pb_field(2, "aptp") + _pb_field(7, graph)
            + _pb_field(8, _pb_field(1, "") + _pb_field(2, 13)))


def _ort_providers(provider: str) -> list[str]:
    if provider == "cuda":
        return [CUDA_EP, "CPUExecutionProvider"]
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    raise BackendError(f"provider {provider!r} is not an onnxruntime provider")


def probe_provider(provider: str) -> list[str]:
    """Open a one-node session with onnxruntime `provider` ("cpu" | "cuda") and return the execution
    providers the session really got (`get_providers()`): onnxruntime falls back to the CPU with only
    a log line when the CUDA provider cannot start (no GPU, CUDA or cuDNN libraries not found)."""
    ort = import_ort()
    if provider == "cuda":
        _preload_cuda_libraries(ort)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    sess = ort.InferenceSession(probe_model_bytes(), sess_options=options, providers=_ort_providers(provider))
    out = sess.run(None, {"x": np.ones(1, np.float32)})[0]
    if out.shape != (1,) or out[0] != 1.0:
        raise BackendError(f"onnxruntime provider {provider!r} computed a wrong result on a one-node graph")
    return list(sess.get_providers())


def cuda_unavailable_reason() -> str | None:
    """None if onnxruntime can run graphs on CUDA here, else one line saying why and what to install."""
    ort = import_ort()
    flavour = ort_flavour()
    if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
        return (f"onnxruntime and onnxruntime-gpu are both installed ({flavour}); they share the `onnxruntime` "
                "module and the CPU build can hide CUDA: pip uninstall -y onnxruntime onnxruntime-gpu && "
                "pip install onnxruntime-gpu")
    if CUDA_EP not in ort.get_available_providers():
        return f'this onnxruntime ({flavour}) has no CUDA provider: {_GPU_EXTRA}'
    try:
        got = probe_provider("cuda")
    except BackendError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        return f"onnxruntime ({flavour}) could not create a CUDA session ({str(e).strip().splitlines()[0][:200]})"
    if CUDA_EP not in got:
        return (f"onnxruntime ({flavour}) lists CUDA but a session created with it runs on {', '.join(got)} "
                "(no usable GPU, or the CUDA 12 / cuDNN 9 libraries were not found; "
                "`python -m aptp doctor` shows more)")
    return None


class OrtSession:
    """An onnxruntime InferenceSession behind the `Session` interface.

    Args:
        path: the .onnx file (its external data, if any, next to it).
        provider: "cpu" or "cuda".
        expected_inputs / expected_outputs: the names the runtime will use; a graph with other
            names is refused with an error naming the file.
        threads: intra-op threads (0 = onnxruntime's default).
    """

    max_batch = None  # ONNX graphs exported with a dynamic batch take any batch

    def __init__(self, path: str | os.PathLike, provider: str = "cpu",
                 expected_inputs: tuple[str, ...] = (), expected_outputs: tuple[str, ...] = (),
                 threads: int = 0):
        ort = self._ort = import_ort()
        self.path = Path(path)
        self.provider = provider
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = _ort_providers(provider)
        if provider == "cuda":
            _preload_cuda_libraries(ort)
        try:
            self._sess = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise BackendError(f"{self.path}: onnxruntime cannot load this graph ({str(e).strip()[:300]})") from None
        # onnxruntime drops a provider it cannot start (CUDA/cuDNN not found, no GPU) with a log line only:
        # refuse rather than run on the CPU under a "cuda" label
        got = self._sess.get_providers()
        if provider == "cuda" and CUDA_EP not in got:
            raise BackendError(f"{self.path}: onnxruntime could not start CUDA for this graph (the session got "
                               f"{', '.join(got)}); refusing to run it on the CPU under provider 'cuda'")
        self.input_names = tuple(i.name for i in self._sess.get_inputs())
        self.output_names = tuple(o.name for o in self._sess.get_outputs())
        self._input_types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in self._sess.get_inputs()}
        missing = [n for n in expected_inputs if n not in self.input_names]
        missing += [n for n in expected_outputs if n not in self.output_names]
        if missing:
            raise BackendError(f"{self.path}: graph lacks the tensor(s) {', '.join(missing)} "
                               f"(has inputs {self.input_names}, outputs {self.output_names})")

    def resident_runner(self, feeds: dict[str, np.ndarray]):
        """A callable running the graph on `feeds` copied once to the session's device, outputs left there
        (onnxruntime I/O binding): the graph without host copies, for timing. Returns None when called."""
        ort = import_ort()
        device = "cuda" if self.provider == "cuda" else "cpu"
        binding = self._sess.io_binding()
        values = []
        for name, arr in feeds.items():
            v = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr, dtype=self._input_types[name]), device, 0)
            values.append(v)  # bound by reference: keep alive with the runner
            binding.bind_ortvalue_input(name, v)
        for name in self.output_names:
            binding.bind_output(name, device)
        sess = self._sess

        def call(_values=values):
            sess.run_with_iobinding(binding)

        return call

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph; inputs are cast to the graph's types, float outputs returned as float32. Feeds the
        graph has no input for are left out (an expert without any transformer reads no text context)."""
        cast = {k: np.ascontiguousarray(v, dtype=self._input_types[k]) for k, v in feeds.items()
                if k in self._input_types}
        try:
            outs = self._sess.run(None, cast, _run_options(self._ort))
        except Exception as e:
            raise BackendError(f"{self.path}: inference failed ({str(e).strip()[:300]})") from None
        return {
            name: (o.astype(np.float32) if o.dtype in (np.float16, np.float64) else o)
            for name, o in zip(self.output_names, outs, strict=True)
        }
