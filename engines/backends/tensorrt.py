"""A TensorRT plan behind the `Session` interface (engines/sessions.py), without torch.

Device memory and copies use `cuda-python` (`cuda.bindings.runtime`); TensorRT itself is the
`tensorrt` package. Both are the `tensorrt` extra, imported through `engines.cuda_device`
only when a TensorRT session is opened. Lifecycle (as TensorRT's demo/Diffusion): deserialize the
plan once, then per call set the input shapes (checked against the plan's optimisation profile),
copy inputs to device buffers that grow as needed, `execute_async_v3`, copy outputs back.

Activation memory: an execution context normally allocates the plan's whole activation memory
and keeps it; K experts + dense would hold K+1 such blocks although only one runs at a time. Here
every context is created without memory (`ExecutionContextAllocationStrategy.USER_MANAGED`) and
the sessions of one runtime share one `DeviceMemoryPool`, sized to the largest plan
(`device_memory_size_v2`), as NVIDIA's diffusion demo does. The pool's lock serialises the plans
that share it (one GPU runs one of them at a time anyway), so sessions stay safe to call from
several threads.

An input passed again as the same read-only array (the text context of a denoising loop, which
`engines.denoise` marks read-only) is not copied to the device again.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from .cuda import cuda_check, import_cudart, import_tensorrt, native_handle
from ..errors import BackendError


class DeviceMemoryPool:
    """One block of device memory for the activations of several TensorRT execution contexts that run
    one at a time. `reserve(n)` grows it (contexts bound to the old block re-bind before their next run);
    `lock` is held by a session for the whole of a call."""

    def __init__(self):
        self._cudart = import_cudart()
        self.lock = threading.RLock()
        self.ptr = 0
        self.size = 0
        self.generation = 0  # bumped at every reallocation

    def reserve(self, nbytes: int, what: str = "") -> None:
        with self.lock:
            if nbytes <= self.size:
                return
            if self.ptr:
                cuda_check(self._cudart.cudaFree(self.ptr), "cudaFree")
                self.ptr, self.size = 0, 0
            self.ptr = int(cuda_check(self._cudart.cudaMalloc(nbytes),
                                      f"cudaMalloc({nbytes / 2**20:.0f} MiB) for the TensorRT activations of {what}"))
            self.size = int(nbytes)
            self.generation += 1

    def close(self) -> None:
        with self.lock:
            if self.ptr:
                self._cudart.cudaFree(self.ptr)
            self.ptr, self.size = 0, 0
            self.generation += 1

    def __del__(self):  # pragma: no cover - depends on a GPU
        try:
            self.close()
        except Exception:
            pass


def _new_runtime(trt, logger, path):
    # trt.Runtime / trt.Builder raise TypeError ("pybind11 ... constructor") instead of returning None
    # when CUDA cannot be initialised (no GPU, driver too old)
    try:
        runtime = trt.Runtime(logger)
    except TypeError as e:
        raise BackendError(f"{path}: TensorRT could not start on a CUDA GPU ({str(e).strip()[:200]}); "
                           "`aptp doctor` shows the GPU, driver and versions") from None
    if runtime is None:
        raise BackendError(f"{path}: TensorRT could not start on a CUDA GPU")
    return runtime


def _create_context(trt, engine):
    """An execution context without its own activation memory (TensorRT >= 10; 10.0 spells it differently)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        return engine.create_execution_context(strategy.USER_MANAGED)
    return engine.create_execution_context_without_device_memory()


class TensorRTSession:
    """Run a serialized TensorRT engine (.plan) built by `aptp_export.tensorrt_build`.

    Inputs/outputs are numpy arrays; inputs are cast to the engine's tensor types (float32 I/O by
    construction of the export), float outputs returned as float32. `device_memory`: a pool shared
    with other sessions (default: one of its own). `max_batch`: the profile's largest batch.
    """

    def __init__(self, path: str | os.PathLike, expected_inputs: tuple[str, ...] = (),
                 expected_outputs: tuple[str, ...] = (), device_memory: DeviceMemoryPool | None = None):
        trt = import_tensorrt()
        self._cudart = import_cudart()
        self._trt = trt
        self.path = Path(path)
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._stream = None
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = _new_runtime(trt, self._logger, self.path)
        try:
            engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        except Exception as e:
            raise BackendError(f"{self.path}: TensorRT cannot deserialize this plan ({e})") from None
        if engine is None:
            raise BackendError(f"{self.path}: TensorRT cannot deserialize this plan (built with another "
                               "TensorRT version or for another GPU? rebuild it with `aptp export`)")
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        missing = [n for n in expected_inputs if n not in self.input_names]
        missing += [n for n in expected_outputs if n not in self.output_names]
        if missing:
            raise BackendError(f"{self.path}: engine lacks the tensor(s) {', '.join(missing)}")
        self.max_batch = int(engine.get_tensor_profile_shape(self.input_names[0], 0)[2][0])

        self._own_pool = device_memory is None
        self._pool = device_memory if device_memory is not None else DeviceMemoryPool()
        size = int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)
        self.device_memory_size = size
        self._context = _create_context(trt, engine)
        if self._context is None:
            raise BackendError(f"{self.path}: TensorRT could not create an execution context")
        self._pool.reserve(size, str(self.path))
        self._bound = -1  # pool generation the context's memory points into
        self._stream = cuda_check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._stream_handle = native_handle(self._stream)
        self._resident: dict[str, np.ndarray] = {}  # input name -> the read-only host array on the device

    # -- internals -------------------------------------------------------------------------------------
    def _bind_memory(self) -> None:
        pool = self._pool
        if self._bound != pool.generation:
            if hasattr(self._context, "set_device_memory"):  # TensorRT >= 10.1: pointer and size
                self._context.set_device_memory(pool.ptr, pool.size)
            else:
                self._context.device_memory = pool.ptr
            self._bound = pool.generation

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if nbytes > cap:
            if ptr:
                cuda_check(self._cudart.cudaFree(ptr), "cudaFree")
                self._buffers.pop(name, None)
                self._resident.pop(name, None)
            ptr = int(cuda_check(self._cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes}) for {name}"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
        if len(lo) != len(shape) or any(s < a or s > b for s, a, b in zip(shape, lo, hi, strict=False)):
            raise BackendError(f"{self.path}: input {name} of shape {list(shape)} is outside the engine's "
                               f"profile [{list(lo)} .. {list(hi)}]; re-export with a larger profile")

    def _stage_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Set shapes and addresses and enqueue the host-to-device copies; returns the host arrays (to keep
        alive until the stream is synchronised)."""
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        host = {}
        for name in self.input_names:
            if name not in feeds:
                raise BackendError(f"{self.path}: missing input {name}")
            given = feeds[name]
            arr = np.ascontiguousarray(given, dtype=self._dtypes[name])
            self._check_profile(name, arr.shape)
            if not self._context.set_input_shape(name, arr.shape):
                raise BackendError(f"{self.path}: TensorRT refused shape {list(arr.shape)} for {name}")
            ptr = self._buffer(name, arr.nbytes)
            if self._resident.get(name) is not arr:
                self._resident.pop(name, None)
                cuda_check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self._stream), "copy in")
                if arr is given and not arr.flags.writeable:
                    self._resident[name] = arr  # cannot change behind our back: next time, no copy
            self._context.set_tensor_address(name, ptr)
            host[name] = arr
        return host

    def _bind_outputs(self) -> dict[str, np.ndarray]:
        outputs = {}
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            out = np.empty(shape, dtype=self._dtypes[name])
            self._context.set_tensor_address(name, self._buffer(name, out.nbytes))
            outputs[name] = out
        return outputs

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream_handle):
            raise BackendError(f"{self.path}: TensorRT execution failed")

    # -- the Session interface ---------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._pool.lock:
            self._bind_memory()
            host_inputs = self._stage_inputs(feeds)  # noqa: F841 - kept alive until the sync below
            outputs = self._bind_outputs()
            self._execute()
            for name, out in outputs.items():
                cuda_check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h,
                                                  self._stream), "copy out")
            cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in outputs.items()}

    def time_device(self, feeds: dict[str, np.ndarray], warmup: int = 3, repeats: int = 20) -> list[float]:
        """Milliseconds of `repeats` executions measured on the GPU with CUDA events, inputs resident on
        the device (uploaded once): the engine alone, no host copies, casts or host synchronisation."""
        cudart = self._cudart
        with self._pool.lock:
            self._bind_memory()
            host_inputs = self._stage_inputs(feeds)  # noqa: F841
            self._bind_outputs()
            start = cuda_check(cudart.cudaEventCreate(), "cudaEventCreate")
            end = cuda_check(cudart.cudaEventCreate(), "cudaEventCreate")
            try:
                for _ in range(warmup):
                    self._execute()
                times = []
                for _ in range(repeats):
                    cuda_check(cudart.cudaEventRecord(start, self._stream), "cudaEventRecord")
                    self._execute()
                    cuda_check(cudart.cudaEventRecord(end, self._stream), "cudaEventRecord")
                    cuda_check(cudart.cudaEventSynchronize(end), "cudaEventSynchronize")
                    times.append(float(cuda_check(cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime")))
            finally:
                cudart.cudaEventDestroy(start)
                cudart.cudaEventDestroy(end)
        return times

    def close(self) -> None:
        """Free device buffers and the stream (also done at garbage collection); a pool of its own too."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr, _ in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        self._resident = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        if getattr(self, "_own_pool", False):
            self._pool.close()

    def __del__(self):  # pragma: no cover - depends on a GPU
        try:
            self.close()
        except Exception:
            pass
