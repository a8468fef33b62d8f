"""OpenVINO behind the `Session` interface (engines.backends): the "openvino" provider, CPU only.

What it opens: the OpenVINO IR (`.xml`, its weights in the `.bin` of the same stem next to it) that
`aptp quantize` writes per expert (int8 weights and activations, NNCF post-training quantization), or any
ONNX graph (OpenVINO reads ONNX itself). Package `openvino` (extra `openvino`: `pip install -e ".[openvino]"`,
no torch).

Settings, each a session argument with the process default below:
- threads: OpenVINO's INFERENCE_NUM_THREADS (0 = its default, one stream over all cores);
- precision: INFERENCE_PRECISION_HINT for the layers that are not int8. "f32" by default: on CPUs with
  AVX512_BF16 or AMX, OpenVINO would otherwise run every floating-point layer in bf16 without being asked
  (about 3 significant digits), and the runtime's outputs would change with the machine. "bf16" is the
  opt-in speed lever on those CPUs (`aptp doctor` lists the flags);
- cache_dir: compiled models cached on disk (OpenVINO's CACHE_DIR), so a second process starts without
  compiling: `$APTP_OPENVINO_CACHE`, else `$XDG_CACHE_HOME/aptp/openvino` (~/.cache/...); "" turns it off.

OpenVINO infer requests are not thread-safe, the compiled model is: each calling thread gets its own
request (the server's workers call one session concurrently). The compiled model keeps the batch dynamic
(one graph for every batch size) with a latency hint (one stream), so a sample's output does not depend on
what else is in its batch (tests/engines/test_openvino.py checks this bitwise).
"""

from __future__ import annotations

from ..install import install_hint
import os
import threading
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import BackendError

INSTALL_HINT = install_hint("openvino")
PRECISIONS = ("f32", "bf16")

_NP_TYPES = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "i64": np.int64, "i32": np.int32}
_CORE: dict = {}
_CORE_LOCK = threading.Lock()


def import_openvino():
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendError(f"openvino is not installed: {INSTALL_HINT}") from e
    return ov


def openvino_version() -> str | None:
    """The installed openvino distribution's version, or None (never imports it)."""
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


def default_cache_dir() -> str:
    env = os.environ.get("APTP_OPENVINO_CACHE")
    if env is not None:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aptp", "openvino")


def core():
    """One OpenVINO Core per process (it owns the plugins and their thread pools)."""
    with _CORE_LOCK:
        if "core" not in _CORE:
            _CORE["core"] = import_openvino().Core()
        return _CORE["core"]


def check_openvino() -> None:
    """Raise BackendError unless OpenVINO is installed and has a CPU device."""
    devices = core().available_devices
    if "CPU" not in devices:
        raise BackendError(f"OpenVINO {openvino_version()} has no CPU device here (devices: {devices})")


class OvSession:
    """A compiled OpenVINO model behind the `Session` interface.

    Args:
        path: an OpenVINO IR .xml (weights in the .bin beside it) or an .onnx file.
        expected_inputs / expected_outputs: names the runtime will use; a graph without them is refused.
        threads: INFERENCE_NUM_THREADS (0 = OpenVINO's default).
        precision: "f32" (default) or "bf16", OpenVINO's inference precision for non-int8 layers.
        cache_dir: compiled-model cache (None = default_cache_dir(); "" = no cache).
    """

    max_batch = None

    def __init__(self, path: str | os.PathLike | None, expected_inputs: tuple[str, ...] = (),
                 expected_outputs: tuple[str, ...] = (), threads: int = 0, precision: str | None = None,
                 cache_dir: str | None = None, model=None):
        """`model`: an in-memory openvino.Model to compile instead of reading `path` (aptp quantize's
        candidates, judged before any is saved; nothing is cached for them)."""
        self.path = Path(path) if path is not None else Path("<in-memory model>")
        precision = precision or os.environ.get("APTP_OPENVINO_PRECISION", "f32")
        if precision not in PRECISIONS:
            raise BackendError(f"openvino precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        ov_core = core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        cache = "" if model is not None else default_cache_dir() if cache_dir is None else cache_dir
        if cache:
            try:
                os.makedirs(cache, exist_ok=True)
                config["CACHE_DIR"] = cache
            except OSError as e:  # a read-only home: compile every time rather than fail
                warnings.warn(f"OpenVINO compiled-model cache {cache} is not writable ({e}); compiling without it "
                              "(set APTP_OPENVINO_CACHE to a writable directory)", RuntimeWarning, stacklevel=2)
        try:
            if model is None:
                model = ov_core.read_model(str(self.path))
            self._compiled = ov_core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with long messages
            raise BackendError(f"{self.path}: OpenVINO cannot load this graph ({str(e).strip()[:300]})") from None
        self.input_names = tuple(p.get_any_name() for p in self._compiled.inputs)
        self.output_names = tuple(p.get_any_name() for p in self._compiled.outputs)
        self._input_types = {p.get_any_name(): _NP_TYPES.get(p.get_element_type().get_type_name(), np.float32)
                             for p in self._compiled.inputs}
        missing = [n for n in expected_inputs if n not in self.input_names]
        missing += [n for n in expected_outputs if n not in self.output_names]
        if missing:
            raise BackendError(f"{self.path}: graph lacks the tensor(s) {', '.join(missing)} "
                               f"(has inputs {self.input_names}, outputs {self.output_names})")
        self._local = threading.local()

    def setting(self, name: str) -> str:
        """A property of the compiled model as OpenVINO reports it (e.g. "INFERENCE_NUM_THREADS")."""
        return str(self._compiled.get_property(name))

    def _request(self):
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self._compiled.create_infer_request()
        return req

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph; inputs cast to the graph's types, float outputs returned as float32 copies. Feeds
        the graph has no input for are left out (an expert without transformers reads no text)."""
        cast = {k: np.ascontiguousarray(v, dtype=self._input_types[k]) for k, v in feeds.items()
                if k in self._input_types}
        req = self._request()
        try:
            req.infer(cast)
        except Exception as e:
            raise BackendError(f"{self.path}: inference failed ({str(e).strip()[:300]})") from None
        out = {}
        for i, name in enumerate(self.output_names):
            a = req.get_output_tensor(i).data
            out[name] = a.astype(np.float32) if a.dtype in (np.float16, np.float64) else a.copy()
        return out
