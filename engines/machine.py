"""What this CPU is, for bug reports and for every measured figure: float32 rounding and speed both
depend on which SIMD kernels numpy, torch and onnxruntime dispatch to, and the machines this project
runs on differ from session to session (AMD Zen 5, Intel Xeon with or without AVX-512 / AMX, ...).

    cpu_info()  # {"model": ..., "vendor": ..., "cores": 2, "isa": [...kernel-relevant flags...], "flags": "..."}

Linux reads /proc/cpuinfo; elsewhere only `platform` is known. No torch, no subprocess.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags that decide which kernels run (and how fast low-precision paths are), in this order.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
             "asimd", "sve", "sve2", "i8mm", "bf16")


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's `key: value` fields of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_info(cpuinfo_path: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """Model, vendor, logical cores, the kernel-relevant ISA flags present, and the full flag string."""
    info = {"model": platform.processor() or platform.machine(), "vendor": None, "arch": platform.machine(),
            "cores": os.cpu_count(), "isa": [], "flags": None}
    try:
        fields = _cpuinfo_fields(Path(cpuinfo_path).read_text(errors="replace"))
    except OSError:
        return info
    info["model"] = fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or info["model"]
    info["vendor"] = fields.get("vendor_id") or fields.get("cpu implementer")
    flags = (fields.get("flags") or fields.get("features") or "").split()
    present = set(flags)
    info["isa"] = [f for f in ISA_FLAGS if f in present]
    info["flags"] = " ".join(flags) or None
    return info


def memory_available(meminfo_path: str | os.PathLike = "/proc/meminfo") -> int | None:
    """Bytes of memory the kernel says a new workload can use without swapping (MemAvailable); None where
    unknown (no /proc/meminfo)."""
    try:
        for line in Path(meminfo_path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
