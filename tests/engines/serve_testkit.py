"""Start a real `aptp serve` process on 127.0.0.1 (torch, diffusers and transformers blocked) and stop it."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from test_engines_torchfree import BLOCKER, HEAVY

# `aptp serve ...` with torch, diffusers and transformers blocked
LAUNCH = BLOCKER + """
from aptp.cli import main
sys.exit(main(["serve", *sys.argv[2:]]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_lines(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


@contextlib.contextmanager
def running_server(export_dir, *flags: str, blocked=tuple(HEAVY), ready_timeout: float = 120.0, env=None):
    """Yield a ServerProcess once /readyz answers 200; terminate it (if still running) afterwards."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="aptp_serve_", suffix=".log")[1])
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, json.dumps(list(blocked)), "--engines", str(export_dir),
                                 "--port", str(port), *flags], stdout=f, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        end = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > end:
                raise RuntimeError(f"server not ready after {ready_timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.unlink(missing_ok=True)
