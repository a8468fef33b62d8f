"""Inference backends: one small session interface over onnxruntime and TensorRT, and the registry that
opens a file of each kind.

A session has `input_names`, `output_names` and `run(feeds) -> {name: array}`; inputs are given and
outputs returned as float32 / int64 numpy arrays whatever the graph's internal precision, so the
denoising loop never sees the backend. Providers (what a user asks `Runtime.load` for):

- "cpu" / "cuda": ONNX graphs on onnxruntime (engines.backends.ort);
- "tensorrt": TensorRT plans for the UNets (engines.backends.tensorrt, CUDA helpers in
  engines.backends.cuda); the other graphs run on onnxruntime's CUDA provider when it works here, else
  on its CPU provider, which `Runtime.part_providers` records and a warning says.
- "openvino": the OpenVINO IR of each UNet that has one (int8, written by `aptp quantize`;
  engines.backends.openvino), on the CPU; the other graphs (router, text encoder, VAE decoder, UNets the
  quality guard kept in fp32) on onnxruntime's CPU provider.

A new backend is one module here and one entry in `OPENERS` (file kind -> opener) and, if users ask for
it by name, in `PROVIDERS` and `check_provider`. `engines.backends.doctor` reports what works here.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from ..errors import BackendError
from .cuda import device_info, import_cudart, import_tensorrt
from .ort import OrtSession, cuda_unavailable_reason, import_ort
from .openvino import OvSession, check_openvino
from .tensorrt import TensorRTSession

PROVIDERS = ("cpu", "cuda", "tensorrt", "openvino")


class Session(Protocol):
    """What the runtime needs from a backend. `max_batch`: the largest first dimension the session
    accepts (a TensorRT plan's profile maximum), None when unbounded."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    max_batch: int | None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_provider(provider: str) -> None:
    """Raise BackendError early (before any file is opened) if `provider` cannot work here.

    "cuda" is checked by running a one-node graph on it: a session that would silently fall back to the
    CPU is refused. "tensorrt" needs tensorrt, cuda-python and a visible GPU (engines.backends.cuda)."""
    if provider not in PROVIDERS:
        raise BackendError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    if provider == "cpu":
        import_ort()
    elif provider == "openvino":
        import_ort()  # the graphs without an IR run on onnxruntime's CPU provider
        check_openvino()
    elif provider == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise BackendError(f'provider "cuda" cannot run here: {reason}')
    else:
        import_tensorrt()
        import_cudart()
        device_info()  # BackendError naming the cause when no GPU is usable


def _open_onnx(path, provider, expected_inputs, expected_outputs, threads, ort_provider, device_memory) -> Session:
    return OrtSession(path, ort_provider or provider, expected_inputs, expected_outputs, threads=threads)


def _open_tensorrt(path, provider, expected_inputs, expected_outputs, threads, ort_provider, device_memory) -> Session:
    return TensorRTSession(path, expected_inputs=expected_inputs, expected_outputs=expected_outputs,
                           device_memory=device_memory)


def _open_openvino(path, provider, expected_inputs, expected_outputs, threads, ort_provider, device_memory) -> Session:
    return OvSession(path, expected_inputs, expected_outputs, threads=threads)


OPENERS = {"onnx": _open_onnx, "tensorrt": _open_tensorrt, "openvino": _open_openvino}  # file kind (manifest `files` key) -> opener


def open_session(path: str | os.PathLike, provider: str, kind: str = "onnx",
                 expected_inputs: tuple[str, ...] = (), expected_outputs: tuple[str, ...] = (),
                 threads: int = 0, ort_provider: str | None = None, device_memory=None) -> Session:
    """Open `path` with the backend for file `kind` ("onnx" | "tensorrt" | "openvino"): a TensorRT plan, an
    OpenVINO IR (.xml, its .bin beside it), or an ONNX graph
    on onnxruntime's `ort_provider` ("cpu" | "cuda"; default: `provider`, which must then be "cpu" or
    "cuda"). `threads` = onnxruntime intra-op threads (0 = its default, one per core); `device_memory`:
    the TensorRT activation memory shared by the plans of one runtime (engines.backends.tensorrt)."""
    if kind not in OPENERS:
        raise BackendError(f"{path}: no backend opens files of kind {kind!r} (known: {', '.join(OPENERS)})")
    return OPENERS[kind](path, provider, expected_inputs, expected_outputs, threads, ort_provider, device_memory)


__all__ = ["OPENERS", "PROVIDERS", "Session", "check_provider", "open_session"]
