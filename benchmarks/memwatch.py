"""Peak memory per phase of a process, and a watchdog that stops a child process before it takes the machine.

    phases = Phases(progress_path)            # in the process being measured
    with phases("export"):
        ...
    phases.records                            # [{"phase", "seconds", "rss_start_gb", "peak_gb", "rss_end_gb"}]

    res = run_watched(cmd, limit_gb=20, progress=progress_path)   # in the parent
    res.killed, res.phase, res.rss_gb                              # where memory ran out, if it did

A phase's peak is the kernel's resident high-water mark (VmHWM), reset at the start of the phase by
writing 5 to /proc/self/clear_refs (Linux >= 4.0): the peak of that phase alone, not of the process so far.
Where the reset is not allowed the peak is the process's so far (`peak_resets` says which). The progress file
holds the records so far and the phase running, rewritten at every phase boundary: after the parent kills a
child over its limit it says in which phase the child was.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def _status_kb(key: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_gb(pid: int | str = "self") -> float:
    kb = _status_kb("VmRSS", pid)
    return float("nan") if kb is None else kb / 1e6


def hwm_gb(pid: int | str = "self") -> float:
    """Resident high-water mark (since start or the last `reset_peak`), GB."""
    kb = _status_kb("VmHWM", pid)
    return float("nan") if kb is None else kb / 1e6


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Context manager factory timing phases and recording their peak RSS (see module doc)."""

    def __init__(self, progress: str | os.PathLike | None = None, **meta):
        self.progress = Path(progress) if progress else None
        self.meta = meta
        self.records: list[dict] = []
        self.peak_resets = True

    def _write(self, running: str | None) -> None:
        if self.progress is None:
            return
        tmp = self.progress.with_name(self.progress.name + ".tmp")
        tmp.write_text(json.dumps({**self.meta, "phases": self.records, "running": running}, indent=1))
        os.replace(tmp, self.progress)

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = rss_gb()
        self.peak_resets = reset_peak() and self.peak_resets
        self._write(name)
        t = time.perf_counter()
        rec = {"phase": name, "rss_start_gb": start}
        try:
            yield rec  # the caller may add figures to the record
        finally:
            rec.update(seconds=time.perf_counter() - t, peak_gb=hwm_gb(), rss_end_gb=rss_gb())
            self.records.append(rec)
            self._write(None)

    def note(self, **kw) -> None:
        """Add figures to the progress file outside any phase."""
        self.meta.update(kw)
        self._write(None)


@dataclass
class Watched:
    returncode: int
    killed: bool            # stopped by the watchdog for exceeding limit_gb
    phase: str | None       # the phase the child was in when it was stopped or died (from its progress file)
    rss_gb: float           # the child's last sampled RSS
    peak_gb: float          # the largest RSS sampled
    seconds: float
    progress: dict


def read_progress(path: str | os.PathLike | None) -> dict:
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def run_watched(cmd: list[str], limit_gb: float, progress: str | os.PathLike | None = None, poll_s: float = 0.2,
                **popen_kwargs) -> Watched:
    """Run `cmd`, sampling its RSS every `poll_s`; kill it (SIGKILL) as soon as it exceeds `limit_gb`.

    Sampling can miss a spike shorter than `poll_s`; the child's own per-phase peaks (Phases) do not."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    last = peak = 0.0
    killed = False
    while proc.poll() is None:
        r = rss_gb(proc.pid)
        if r == r:  # not nan (the process may be gone between poll and read)
            last, peak = r, max(peak, r)
        if r > limit_gb:
            proc.kill()
            killed = True
            break
        time.sleep(poll_s)
    rc = proc.wait()
    prog = read_progress(progress)
    phase = prog.get("running")
    return Watched(rc, killed, phase, last, peak, time.perf_counter() - t, prog)
