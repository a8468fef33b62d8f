"""Wall-clock measurement with warm-up, repeats, median and p90.

Timing is side by side in one process: callers alternate the models under test in rounds
(`interleaved`), so that a neighbour process that slows the shared machine for a while slows
every model alike instead of biasing whichever happened to run then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return {"latency_ms_median": self.median_ms, "latency_ms_p90": self.p90_ms,
                "latency_ms_min": self.min_ms, "repeats": self.repeats}


def _summary(samples_s: list[float]) -> Timing:
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
    return _summary(samples)


def interleaved(fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 10) -> dict[str, Timing]:
    """Time several callables in alternating rounds (one call of each per round)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
    return {k: _summary(v) for k, v in samples.items()}
