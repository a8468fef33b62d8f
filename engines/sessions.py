"""Inference sessions: one small interface over onnxruntime and TensorRT.

A session has `input_names`, `output_names` and `run(feeds) -> {name: array}`; inputs are given
and outputs returned as float32 / int64 numpy arrays whatever the graph's internal precision, so
the denoising loop never sees the backend. Providers:

- "cpu": onnxruntime's CPUExecutionProvider (package `onnxruntime`, extra `aptp[runtime]`);
- "cuda": onnxruntime's CUDAExecutionProvider (package `onnxruntime-gpu`, extra `aptp[gpu]`);
- "tensorrt": TensorRT plans (`engines.tensorrt_session`, extra `aptp[tensorrt]`); graphs exported
  without a plan run with onnxruntime on CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import BackendError

PROVIDERS = ("cpu", "cuda", "tensorrt")

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
}


class Session(Protocol):
    """What the runtime needs from a backend."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError('onnxruntime is not installed: pip install "aptp[runtime]" '
                           '(or "aptp[gpu]" for CUDA)') from e
    return ort


def check_provider(provider: str) -> None:
    """Raise BackendError early (before any file is opened) if `provider` cannot work here."""
    if provider not in PROVIDERS:
        raise BackendError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    if provider == "cpu":
        _import_ort()
    elif provider == "cuda":
        ort = _import_ort()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError('provider "cuda" needs onnxruntime-gpu and a CUDA GPU: pip install "aptp[gpu]"')
    else:
        from .tensorrt_session import import_cudart, import_tensorrt

        import_tensorrt()
        import_cudart()


class OrtSession:
    """An onnxruntime InferenceSession behind the `Session` interface.

    Args:
        path: the .onnx file (its external data, if any, next to it).
        provider: "cpu" or "cuda".
        expected_inputs / expected_outputs: the names the runtime will use; a graph with other
            names is refused with an error naming the file.
        threads: intra-op threads (0 = onnxruntime's default).
    """

    def __init__(self, path: str | os.PathLike, provider: str = "cpu",
                 expected_inputs: tuple[str, ...] = (), expected_outputs: tuple[str, ...] = (),
                 threads: int = 0):
        ort = _import_ort()
        self.path = Path(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if provider == "cuda":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif provider == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise BackendError(f"OrtSession: provider {provider!r} is not an onnxruntime provider")
        try:
            self._sess = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise BackendError(f"{self.path}: onnxruntime cannot load this graph ({str(e).strip()[:300]})") from None
        self.input_names = tuple(i.name for i in self._sess.get_inputs())
        self.output_names = tuple(o.name for o in self._sess.get_outputs())
        self._input_types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in self._sess.get_inputs()}
        missing = [n for n in expected_inputs if n not in self.input_names]
        missing += [n for n in expected_outputs if n not in self.output_names]
        if missing:
            raise BackendError(f"{self.path}: graph lacks the tensor(s) {', '.join(missing)} "
                               f"(has inputs {self.input_names}, outputs {self.output_names})")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph; inputs are cast to the graph's types, float outputs returned as float32."""
        cast = {k: np.ascontiguousarray(v, dtype=self._input_types[k]) for k, v in feeds.items()}
        try:
            outs = self._sess.run(None, cast)
        except Exception as e:
            raise BackendError(f"{self.path}: inference failed ({str(e).strip()[:300]})") from None
        return {
            name: (o.astype(np.float32) if o.dtype in (np.float16, np.float64) else o)
            for name, o in zip(self.output_names, outs, strict=True)
        }


def open_session(path: str | os.PathLike, provider: str, kind: str = "onnx",
                 expected_inputs: tuple[str, ...] = (), expected_outputs: tuple[str, ...] = (),
                 threads: int = 0) -> Session:
    """Open `path` with the backend for (`provider`, file `kind` "onnx" | "tensorrt");
    `threads` = onnxruntime intra-op threads (0 = its default, one per core)."""
    if kind == "tensorrt":
        from .tensorrt_session import TensorRTSession

        return TensorRTSession(path, expected_inputs=expected_inputs, expected_outputs=expected_outputs)
    ort_provider = "cpu" if provider == "cpu" else "cuda"
    if provider == "tensorrt" and "CUDAExecutionProvider" not in _import_ort().get_available_providers():
        ort_provider = "cpu"  # a part exported without a plan (e.g. the tokenizer-side graphs) stays usable
    return OrtSession(path, ort_provider, expected_inputs, expected_outputs, threads=threads)
