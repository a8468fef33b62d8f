"""Wall-clock measurement with warm-up, repeats, median and p90.

Timing is side by side in one process: callers alternate the models under test in rounds
(`interleaved`), so that a neighbour process that slows the shared machine for a while slows
every model alike instead of biasing whichever happened to run then.

Switching models costs something of its own: an onnxruntime session's worker threads keep spinning
for a while after its call returns, so the next session's first call shares the cores with them
(measured on the toy dense UNet, 2 cores: 18 ms alone, 31 ms right after other sessions). `settle`
untimed calls of the same model before each timed one absorb that, as they would in a server that
runs one expert for a whole denoising loop.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from engines.machine import cpu_info


def machine() -> dict:
    """The machine a figure was measured on, for every benchmark JSON: CPU model and ISA flags (float32
    rounding and speed depend on the kernels they pick), cores, load, versions of what does the math."""
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("torch", "onnxruntime", "openvino"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        versions["torch_threads"] = sys.modules["torch"].get_num_threads()
    return {"cpu": cpu_info(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "loadavg": list(os.getloadavg()), "versions": versions}


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return {"latency_ms_median": self.median_ms, "latency_ms_p90": self.p90_ms,
                "latency_ms_min": self.min_ms, "repeats": self.repeats}


def timing_summary(samples_s: list[float]) -> Timing:
    a = np.asarray(samples_s) * 1e3
    return Timing(float(np.median(a)), float(np.percentile(a, 90)), float(a.min()), len(a))


def measure(fn: Callable[[], object], warmup: int = 2, repeats: int = 10) -> Timing:
    """Median / p90 / min of `repeats` calls of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return timing_summary(samples)


def interleaved(fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 10, settle: int = 0,
                untimed: dict[str, Callable[[], object]] | None = None, block: int = 1) -> dict[str, Timing]:
    """Time several callables in alternating rounds: per round, each model makes `settle` untimed calls
    and then `block` timed calls in a row (the last round fewer, `repeats` timed calls in all).

    Untimed calls use `untimed[k]` (default: the timed callable itself), so that a wrapper recording
    every call can be bypassed."""
    untimed = untimed or fns
    block = max(1, int(block))
    for _ in range(warmup):
        for k in fns:
            untimed[k]()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(0, repeats, block):
        for k, fn in fns.items():
            for _ in range(settle):
                untimed[k]()
            for _ in range(min(block, repeats - r)):
                t = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t)
    return {k: timing_summary(v) for k, v in samples.items()}
