"""A TensorRT plan behind the `Session` interface (engines/sessions.py), without torch.

Device memory and copies use `cuda-python` (`cuda.bindings.runtime`, or `cuda.cudart` in older
releases); TensorRT itself is the `tensorrt` package. Both are the `aptp[tensorrt]` extra and are
imported only when a TensorRT session is opened. Lifecycle (as TensorRT's demos): deserialize the
plan once, then per call set the input shapes (checked against the plan's optimisation profile),
copy inputs to device buffers that grow as needed, `execute_async_v3`, copy outputs back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import BackendError

_EXTRA = 'pip install "aptp[tensorrt]" (tensorrt and cuda-python; needs an NVIDIA GPU)'


def import_tensorrt():
    """The tensorrt module, or BackendError naming the extra to install."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(f"provider 'tensorrt' needs the tensorrt package: {_EXTRA}") from e
    return trt


def import_cudart():
    """cuda-python's runtime API module, or BackendError naming the extra."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as e:
            raise BackendError(f"provider 'tensorrt' needs cuda-python: {_EXTRA}") from e
    return cudart


def _check(result, what: str):
    """cuda-python calls return (error, *values); raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA error {err} in {what}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class TensorRTSession:
    """Run a serialized TensorRT engine (.plan) built by `aptp_export.tensorrt_build`.

    Inputs/outputs are numpy arrays; inputs are cast to the engine's tensor types (float32 I/O by
    construction of the export), float outputs returned as float32.
    """

    def __init__(self, path: str | os.PathLike, expected_inputs: tuple[str, ...] = (),
                 expected_outputs: tuple[str, ...] = ()):
        trt = import_tensorrt()
        self._cudart = import_cudart()
        self._trt = trt
        self.path = Path(path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        try:
            engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        except Exception as e:
            raise BackendError(f"{self.path}: TensorRT cannot deserialize this plan ({e})") from None
        if engine is None:
            raise BackendError(f"{self.path}: TensorRT cannot deserialize this plan (built with another "
                               "TensorRT version or for another GPU? rebuild it with `aptp export`)")
        self._engine = engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        missing = [n for n in expected_inputs if n not in self.input_names]
        missing += [n for n in expected_outputs if n not in self.output_names]
        if missing:
            raise BackendError(f"{self.path}: engine lacks the tensor(s) {', '.join(missing)}")
        self._stream = _check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if nbytes > cap:
            if ptr:
                _check(self._cudart.cudaFree(ptr), "cudaFree")
            ptr = int(_check(self._cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes}) for {name}"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
        if len(lo) != len(shape) or any(s < a or s > b for s, a, b in zip(shape, lo, hi, strict=False)):
            raise BackendError(f"{self.path}: input {name} of shape {list(shape)} is outside the engine's "
                               f"profile [{list(lo)} .. {list(hi)}]; re-export with a larger profile")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host_inputs = {}
        for name in self.input_names:
            if name not in feeds:
                raise BackendError(f"{self.path}: missing input {name}")
            arr = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            self._check_profile(name, arr.shape)
            if not self._context.set_input_shape(name, arr.shape):
                raise BackendError(f"{self.path}: TensorRT refused shape {list(arr.shape)} for {name}")
            ptr = self._buffer(name, arr.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self._stream), "copy in")
            self._context.set_tensor_address(name, ptr)
            host_inputs[name] = arr  # keep alive until the stream is synchronised
        outputs = {}
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            out = np.empty(shape, dtype=self._dtypes[name])
            ptr = self._buffer(name, out.nbytes)
            self._context.set_tensor_address(name, ptr)
            outputs[name] = out
        if not self._context.execute_async_v3(int(self._stream)):
            raise BackendError(f"{self.path}: TensorRT execution failed")
        for name, out in outputs.items():
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h, self._stream),
                   "copy out")
        _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in outputs.items()}

    def close(self) -> None:
        """Free device buffers and the stream (also done at garbage collection)."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr, _ in self._buffers.values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):  # pragma: no cover - depends on a GPU
        try:
            self.close()
        except Exception:
            pass
