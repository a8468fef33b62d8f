"""Per-request overhead of `aptp serve --ray` (Ray Serve: proxy -> ingress -> expert deployment) against
`aptp serve` (one uvicorn process), and the busiest expert's throughput with 1 vs 2 Ray replicas.

    PYTHONPATH=. python benchmarks/ray_overhead.py [--export DIR] [--requests 60] [--steps 2]

Without --export it builds the tests' tiny 2-expert export (needs torch and diffusers). Both servers get
the same settings (1 worker, 1 onnxruntime thread, step batching); requests are sequential, one image,
`--steps` steps, so the difference of the medians is the serving path's cost. Starts a local Ray of
`--ray-cpus` CPUs (no dashboard, 127.0.0.1) and shuts it down at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"workers": 1, "threads": 1, "batching": "step", "max_steps": 400}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=30).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def _latencies(url: str, prompt: str, n: int, steps: int) -> list[float]:
    out = []
    with httpx.Client(timeout=120) as client:
        for i in range(n + 3):  # 3 warm-up requests not counted
            t = time.perf_counter()
            r = client.post(url + "/v1/images/generations", json={"prompt": prompt, "seed": i, "steps": steps})
            dt = time.perf_counter() - t
            r.raise_for_status()
            if i >= 3:
                out.append(dt * 1000)
    return out


def _throughput(url: str, prompt: str, requests: int, steps: int, concurrency: int) -> float:
    def call(i):
        r = httpx.post(url + "/v1/images/generations", timeout=300, json={"prompt": prompt, "seed": i, "steps": steps})
        r.raise_for_status()

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(call, range(requests)))
    return requests / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", help="export directory (default: build the tests' tiny 2-expert export)")
    ap.add_argument("--requests", type=int, default=60, help="sequential requests per server (median over them)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tp-requests", type=int, default=24, help="requests of the throughput runs")
    ap.add_argument("--tp-steps", type=int, default=30)
    ap.add_argument("--ray-cpus", type=int, default=2)
    args = ap.parse_args(argv)
    if args.export:
        export, prompt = args.export, "a red circle"
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from engines_export_fixture import ANCHORS, build_export

        export, prompt = str(build_export("pixel").dir), ANCHORS[1]
    from engines import Runtime

    expert = Runtime.load(export).route([prompt])[0]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aptp.cli", "serve", "--export", export, "--port", str(port), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        _wait_ready(f"http://127.0.0.1:{port}")
        plain = _latencies(f"http://127.0.0.1:{port}", prompt, args.requests, args.steps)
        plain_tp = _throughput(f"http://127.0.0.1:{port}", prompt, args.tp_requests, args.tp_steps, 8)
    finally:
        proc.terminate()
        proc.wait(60)

    import ray
    from ray import serve

    from engines.serving.ray import APP_NAME, RayOptions, build_app
    from engines.serving.config import ServeConfig

    config = ServeConfig(engines=export, **SETTINGS)
    port = _free_port()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    results = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for replicas in (1, 2):
            options = RayOptions(num_cpus=0.5, experts={str(expert): {"min_replicas": replicas,
                                                                      "max_replicas": replicas}})
            serve.run(build_app(config, options), name=APP_NAME, route_prefix="/")
            _wait_ready(url)
            if replicas == 1:
                results["lat"] = _latencies(url, prompt, args.requests, args.steps)
            _latencies(url, prompt, 8, args.steps)  # warm the new replicas (they warm up on first use)
            results[replicas] = _throughput(url, prompt, args.tp_requests, args.tp_steps, 8)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()

    mp, mr = statistics.median(plain), statistics.median(results["lat"])
    print(f"export {export}, expert {expert}, settings {SETTINGS}")
    print(f"per-request latency, median of {args.requests} sequential requests (1 image, {args.steps} steps):")
    print(f"  aptp serve        {mp:8.2f} ms   (p10 {statistics.quantiles(plain, n=10)[0]:.2f}, "
          f"p90 {statistics.quantiles(plain, n=10)[-1]:.2f})")
    print(f"  aptp serve --ray  {mr:8.2f} ms   (p10 {statistics.quantiles(results['lat'], n=10)[0]:.2f}, "
          f"p90 {statistics.quantiles(results['lat'], n=10)[-1]:.2f})")
    print(f"  Ray overhead      {mr - mp:8.2f} ms   ratio {mr / mp:.2f}x")
    print(f"busiest expert (all requests to expert {expert}), {args.tp_requests} requests x {args.tp_steps} steps, "
          f"8 concurrent:")
    print(f"  aptp serve           {plain_tp:6.2f} req/s")
    print(f"  Ray, 1 replica       {results[1]:6.2f} req/s")
    print(f"  Ray, 2 replicas      {results[2]:6.2f} req/s   ratio 2/1 {results[2] / results[1]:.2f}x "
          f"(on {args.ray_cpus} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
