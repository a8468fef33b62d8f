"""engines.serving.memory: malloc_trim really gives back free heap pages that free() alone keeps."""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
import pytest

from engines.serving import memory

pytestmark = pytest.mark.skipif(not memory.available(), reason="glibc's malloc_trim/mallopt are not available here")


def test_trim_returns_pages_that_free_keeps():
    """60 MB of 1 kB blocks (heap, not mmap), touched, then freed with the last one kept so the heap's top
    cannot shrink by itself: RSS stays up after free() and drops by >= 30 MB after trim()."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    sizes, out = 1000, {}

    def work():  # a thread of its own, like the server's workers (its own arena)
        blocks = [libc.malloc(sizes) for _ in range(60_000)]
        for b in blocks:
            ctypes.memset(b, 1, sizes)
        out["full"] = memory.rss_bytes()
        for b in blocks[:-1]:
            libc.free(b)
        out["freed"] = memory.rss_bytes()
        out["released"] = memory.trim()
        out["trimmed"] = memory.rss_bytes()
        libc.free(blocks[-1])

    t = threading.Thread(target=work)
    t.start()
    t.join()
    mb = {k: v / 2**20 for k, v in out.items() if k != "released"}
    assert out["released"], mb
    assert mb["freed"] - mb["trimmed"] >= 30, mb


def test_heap_trimmer_reports_rounds():
    rounds = []
    trimmer = memory.HeapTrimmer(0.05, rounds.append).start()
    time.sleep(0.5)
    trimmer.stop()
    assert len(rounds) >= 3
    r = rounds[-1]
    assert r["rss_before"] > 0 and r["rss_after"] > 0 and r["python_blocks"] > 1000
    n = len(rounds)
    time.sleep(0.2)
    assert len(rounds) <= n + 1  # stopped
    assert not memory.HeapTrimmer(0).start()._thread.is_alive()  # 0 = off


def test_limit_arenas(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert memory.limit_arenas(0) is False
    assert memory.limit_arenas(64) is True  # many: changes nothing for the rest of the suite
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert memory.limit_arenas(2) is False  # the environment wins


def test_arena_shrinkage_keeps_images_bitwise(pixel):
    """The server's onnxruntime arena shrinkage changes memory only: images bitwise equal with it off and on."""
    from engines import Runtime
    from engines.backends import ort as eort

    rt = Runtime.load(pixel.dir, threads=1)
    try:
        eort.shrink_cpu_arena(False)
        assert eort._run_options(eort.import_ort()) is None
        off = [np.asarray(im) for im in rt.generate(["a red circle"] * 3, steps=3, seed=5)]
        eort.shrink_cpu_arena(True)
        ro = eort._run_options(eort.import_ort())
        assert ro.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
        on = [np.asarray(im) for im in rt.generate(["a red circle"] * 3, steps=3, seed=5)]
    finally:
        eort.shrink_cpu_arena(False)
    assert all(np.array_equal(a, b) for a, b in zip(off, on, strict=True))
