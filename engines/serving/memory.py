"""Keeping the server's native heap flat: glibc arena limit, periodic `malloc_trim`, a memory log.

A long soak of `aptp serve` grew resident memory in steps (+14 % over 10 minutes, docs/serving.md) while the
number of live Python objects stayed flat: freed native memory (image buffers, onnxruntime outputs of varying
batch shapes) stays in glibc's per-thread arenas and is not returned to the system. Two glibc knobs bound it:
`mallopt(M_ARENA_MAX, n)` before the worker threads start (fewer arenas, less fragmentation) and
`malloc_trim(0)` now and then (returns free pages at the top of every arena). Neither exists on musl or macOS;
there both are no-ops and `available()` is False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _libc():
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


_LIBC = _libc()


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def available() -> bool:
    """True where glibc's mallopt/malloc_trim can be called."""
    return _LIBC is not None


def limit_arenas(n: int) -> bool:
    """At most `n` malloc arenas for threads created from now on (0: leave glibc's default, 8 x cores)."""
    if n <= 0 or _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:  # the environment wins
        return False
    return bool(_LIBC.mallopt(M_ARENA_MAX, int(n)))


def trim() -> bool:
    """Return free heap pages to the system; True when some were released."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


class HeapTrimmer:
    """A daemon thread that calls `trim()` every `interval_s` and reports each round to `on_round(dict)`:
    rss before and after (bytes) and the number of live Python memory blocks (`sys.getallocatedblocks`,
    flat when the growth is native)."""

    def __init__(self, interval_s: float, on_round=None):
        self.interval_s = float(interval_s)
        self.on_round = on_round
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aptp-heap-trim", daemon=True)

    def start(self) -> HeapTrimmer:
        if self.interval_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def round(self) -> dict:
        before = rss_bytes()
        released = trim()
        info = {"rss_before": before, "rss_after": rss_bytes(), "released": released,
                "python_blocks": sys.getallocatedblocks()}
        if self.on_round is not None:
            self.on_round(info)
        return info

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.round()


def apply_settings(config, on_round=None) -> HeapTrimmer:
    """A serving process's memory settings from its ServeConfig (`aptp serve`, each Ray expert replica): the
    malloc arena limit (call before worker threads start), onnxruntime's arena shrinkage, and the started
    HeapTrimmer (stop it on shutdown)."""
    from ..backends.ort import shrink_cpu_arena

    limit_arenas(config.malloc_arenas)
    shrink_cpu_arena(bool(config.shrink_arena))
    return HeapTrimmer(config.trim_interval_s, on_round)

