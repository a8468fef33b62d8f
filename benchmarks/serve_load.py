"""Load test of `aptp serve`: an open-loop async HTTP client against servers it starts on 127.0.0.1.

    python -m benchmarks.serve_load --engines EXPORT --out OUT [--soak-s 300] [--only capacity,poisson,...]

Every scenario sends a fixed number of requests and stops at a time cap; every server it starts binds
127.0.0.1 only and is stopped at the end. Scenarios:
- capacity: closed loop at concurrency 1, 2, 4, 8 (images/s, p50/p95 latency); capacity = images/s at 8.
- poisson: open-loop Poisson arrivals at 0.5x, 0.9x, 1.5x capacity under both policies; latency, codes,
  each image's wait until its first UNet call (`queued_s`) against the mean UNet call of the server.
- burst: 200 concurrent requests against a 32-image queue: codes, Retry-After on every 503, /readyz after.
- disconnect: clients that give up after 0.3 s; the server's cancellation metrics.
- deadline: 1.5x capacity with a short --timeout-s: 504s and the requests' latency.
- sigterm: SIGTERM at mid-load: in-flight requests' codes, exit code and time to exit.
- soak: Poisson at --soak-rate (0.8) x capacity for --soak-s seconds: resident memory of the server over time,
  live Python blocks, heap returned by malloc_trim, codes.
- fairness: light steps=2 requests on expert 1 behind two n=8, steps=100 requests on expert 0.
- malformed: the hostile corpus (benchmarks.hostile) on one connection: JSON 4xx only, nothing text/plain.
- route_flood: 3 rounds of 10 concurrent /v1/route of 64 x 900 characters (RSS, 200 or fast 503), then
  clients that leave after 0.3 s (prompts routed for them afterwards).
- stalled: 20 sockets that never finish a request and 4 idle keep-alive ones: when each is closed, /readyz.
Writes OUT/serve_load.json and OUT/serve_load.png (latency distributions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import matplotlib.pyplot as plt
import numpy as np

from .hostile import corpus
from .plots import save_figure
from .timing import machine

PROMPTS = [
    "a red circle", "a blue background", "the letter K in red above a small green square", "two yellow triangles",
    "a small green square on the left", "the digit 7 in blue", "a large purple circle at the bottom",
    "three red squares", "the letter A in white on a black background", "an orange triangle above a blue circle",
    "a small cyan circle in the top right", "the digit 3 in green below a red square",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An `aptp serve` subprocess on 127.0.0.1 (its log in OUT/logs/)."""

    def __init__(self, engines: str, log_dir: Path, name: str, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_dir / f"{name}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "aptp", "serve", "--export", engines, "--host", "127.0.0.1",
                                      "--port", str(self.port), *flags], stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"server {name} not ready; see {self.log.name}")
            time.sleep(0.1)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def metric_sum(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for m in re.finditer(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def one_request(client: httpx.AsyncClient, url: str, i: int, steps: int, timeout: float | None = None) -> dict:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps}
    t0 = time.perf_counter()
    rec = {"i": i, "sent": t0}
    try:
        r = await client.post(url + "/v1/images/generations", json=body, timeout=timeout)
        rec["code"] = r.status_code
        if r.status_code == 200:
            d = r.json()["data"]
            rec["images"] = len(d)
            rec["queued_s"] = d[0]["queued_s"]
            rec["expert"] = d[0]["expert"]
            rec["ok_images"] = all(len(x["b64_json"]) > 100 for x in d)
        elif r.status_code == 503:
            rec["retry_after"] = r.headers.get("retry-after")
    except httpx.TimeoutException:
        rec["code"] = "client_timeout"
    except httpx.HTTPError as e:
        rec["code"] = type(e).__name__
    rec["latency_s"] = time.perf_counter() - t0
    return rec


def count_codes(codes) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in codes:
        out[str(c)] = out.get(str(c), 0) + 1
    return out


def summarise(recs: list[dict], wall: float) -> dict:
    ok = [r for r in recs if r.get("code") == 200]
    lat = np.array([r["latency_s"] for r in ok]) if ok else np.array([np.nan])
    codes = count_codes(r.get("code") for r in recs)
    q = np.array([r["queued_s"] for r in ok]) if ok else np.array([np.nan])
    return {"requests": len(recs), "codes": codes, "images_per_s": sum(r.get("images", 0) for r in ok) / wall,
            "wall_s": wall, "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
            "queued_p50_s": float(np.percentile(q, 50)), "queued_p95_s": float(np.percentile(q, 95)),
            "queued_max_s": float(np.max(q))}


async def closed_loop(url: str, concurrency: int, total: int, steps: int, cap_s: float) -> tuple[list, float]:
    recs, counter = [], iter(range(total))
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def loop():
            for i in counter:
                if time.perf_counter() - t0 > cap_s:
                    return
                recs.append(await one_request(client, url, i, steps))
        await asyncio.gather(*[loop() for _ in range(concurrency)])
    return recs, time.perf_counter() - t0


async def open_loop(url: str, rate: float, total: int, steps: int, cap_s: float, seed: int = 0,
                    timeout: float | None = None, on_tick=None) -> tuple[list, float]:
    """Poisson arrivals at `rate` requests/s (exponential gaps), `total` requests or `cap_s` seconds."""
    rng = random.Random(seed)
    tasks = []
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=1000)) as client:
        nxt = t0
        for i in range(total):
            nxt += rng.expovariate(rate)
            now = time.perf_counter()
            if nxt - t0 > cap_s:
                break
            if nxt > now:
                await asyncio.sleep(nxt - now)
            if on_tick is not None:
                on_tick(i)
            tasks.append(asyncio.ensure_future(one_request(client, url, i, steps, timeout)))
        recs = list(await asyncio.gather(*tasks))
    return recs, time.perf_counter() - t0


def mean_unet_call_s(text: str) -> float:
    return metric_sum(text, "aptp_unet_call_seconds_sum") / max(1.0, metric_sum(text, "aptp_unet_call_seconds_count"))


def _capacity(result: dict) -> float | None:
    """Images/s at 8 concurrent clients, measured by the capacity scenario (None when it did not run)."""
    return result.get("capacity", {}).get("8", {}).get("images_per_s")


def scenario_capacity(args, base: list[str], out: Path, result: dict) -> None:
    """Closed loop at 1, 2, 4, 8 concurrent clients (step policy): images/s and the mean UNet call."""
    srv = Server(args.engines, out / "logs", "capacity", *base, "--batching", "step")
    result["capacity"] = {}
    for c in (1, 2, 4, 8):
        recs, wall = asyncio.run(closed_loop(srv.url, c, max(args.requests // 2, 4 * c) if c == 1 else args.requests,
                                     args.steps, args.cap_s))
        result["capacity"][str(c)] = summarise(recs, wall)
        print("capacity", c, result["capacity"][str(c)], flush=True)
    result["capacity"]["mean_unet_call_s"] = mean_unet_call_s(srv.metrics())
    srv.stop()
    result["capacity"]["speedup_8_vs_1"] = _capacity(result) / result["capacity"]["1"]["images_per_s"]


def scenario_poisson(args, base: list[str], out: Path, result: dict) -> None:
    """Open-loop Poisson arrivals at 0.5 / 0.9 / 1.5 x capacity, request vs step policy."""
    result["poisson"] = {}
    for policy in ("request", "step"):
        srv = Server(args.engines, out / "logs", f"poisson_{policy}", *base, "--batching", policy,
                     "--max-queue-images", "64")
        for f in (0.5, 0.9, 1.5):
            recs, wall = asyncio.run(open_loop(srv.url, f * _capacity(result), args.requests, args.steps, args.cap_s, seed=1))
            s = summarise(recs, wall)
            s["mean_unet_call_s"] = mean_unet_call_s(srv.metrics())
            s["queued_s"] = [r["queued_s"] for r in recs if r.get("code") == 200]
            s["latency_s"] = [r["latency_s"] for r in recs if r.get("code") == 200]
            result["poisson"][f"{policy}@{f}"] = s
            print("poisson", policy, f, {k: v for k, v in s.items() if not isinstance(v, list)}, flush=True)
        srv.stop()
    for f in (0.5, 0.9, 1.5):
        st, rq = result["poisson"][f"step@{f}"], result["poisson"][f"request@{f}"]
        q = np.array(st["queued_s"])
        st["frac_first_step_within_one_unet_call"] = float(np.mean(q <= st["mean_unet_call_s"])) if len(q) else None
        st["p50_vs_request"] = st["latency_p50_s"] / rq["latency_p50_s"]


def scenario_burst(args, base: list[str], out: Path, result: dict) -> None:
    """200 requests at once against a 32-image queue: every refusal a 503 with Retry-After."""
    srv = Server(args.engines, out / "logs", "burst", *base, "--max-queue-images", "32")

    async def burst():
        async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=250)) as client:
            return await asyncio.gather(*[one_request(client, srv.url, i, args.steps) for i in range(200)])

    t0 = time.perf_counter()
    recs = asyncio.run(burst())
    s = summarise(recs, time.perf_counter() - t0)
    s["every_503_has_retry_after"] = all(r.get("retry_after") for r in recs if r.get("code") == 503)
    s["every_200_has_its_image"] = all(r.get("ok_images") and r.get("images") == 1 for r in recs if r.get("code") == 200)
    s["readyz_after"] = httpx.get(srv.url + "/readyz").status_code
    srv.stop()
    result["burst"] = s
    print("burst", s, flush=True)


def scenario_disconnect(args, base: list[str], out: Path, result: dict) -> None:
    """Clients that give up mid-request: their images leave the queue or batch within a call."""
    srv = Server(args.engines, out / "logs", "disconnect", *base, "--max-steps", "500")

    async def disconnects():
        async with httpx.AsyncClient(timeout=None) as client:
            return await asyncio.gather(*[one_request(client, srv.url, i, 400, timeout=0.3 + 0.1 * i)
                                          for i in range(8)])

    recs = asyncio.run(disconnects())
    time.sleep(1.0)
    text = srv.metrics()
    s = {"client_timeouts": sum(r["code"] == "client_timeout" for r in recs),
         "cancellations": metric_sum(text, "aptp_cancellations_total", reason="disconnect"),
         "released_images": metric_sum(text, "aptp_cancel_release_unet_calls_count", reason="disconnect"),
         "released_within_1_call": metric_sum(text, "aptp_cancel_release_unet_calls_bucket", reason="disconnect", le="1.0"),
         "release_seconds_mean": metric_sum(text, "aptp_cancel_release_seconds_sum", reason="disconnect")
         / max(1, metric_sum(text, "aptp_cancel_release_seconds_count", reason="disconnect")),
         "mean_unet_call_s": mean_unet_call_s(text),
         "active_after": metric_sum(text, "aptp_active_images")}
    srv.stop()
    result["disconnect"] = s
    print("disconnect", s, flush=True)


def scenario_deadline(args, base: list[str], out: Path, result: dict) -> None:
    """1.5 x capacity with a short server timeout: late requests end as 504, their work dropped."""
    single = args.steps * result.get("capacity", {}).get("mean_unet_call_s", 0.01)
    timeout = max(1.0, 4 * single)
    srv = Server(args.engines, out / "logs", "deadline", *base, "--timeout-s", f"{timeout:.2f}",
                 "--max-queue-images", "64")
    recs, wall = asyncio.run(open_loop(srv.url, 1.5 * _capacity(result), args.requests, args.steps, args.cap_s, seed=2))
    s = summarise(recs, wall)
    text = srv.metrics()
    s.update(timeout_s=timeout, deadline_cancellations=metric_sum(text, "aptp_cancellations_total", reason="deadline"),
             max_latency_504_s=max([r["latency_s"] for r in recs if r.get("code") == 504], default=None))
    srv.stop()
    result["deadline"] = s
    print("deadline", s, flush=True)


def scenario_sigterm(args, base: list[str], out: Path, result: dict) -> None:
    """SIGTERM mid-load: admitted work drains within drain_timeout_s, later requests get 503."""
    drain = 30.0
    srv = Server(args.engines, out / "logs", "sigterm", *base, "--drain-timeout-s", str(drain),
                 "--max-queue-images", "64")
    sent_at = {}
    t_kill = {}

    def tick(i):
        sent_at[i] = time.perf_counter()
        if i == args.requests // 2 and not t_kill:
            t_kill["t"] = time.perf_counter()
            srv.proc.send_signal(signal.SIGTERM)

    recs, wall = asyncio.run(open_loop(srv.url, 0.9 * (_capacity(result) or 2.0), args.requests, args.steps, args.cap_s, seed=3,
                               on_tick=tick))
    rc = srv.proc.wait(drain + 30)
    exit_s = time.perf_counter() - t_kill["t"]
    before = [r for r in recs if r["i"] < args.requests // 2]
    after = [r for r in recs if r["i"] > args.requests // 2]
    s = {"drain_timeout_s": drain, "exit_code": rc, "exit_after_s": exit_s,
         "before_sigterm_codes": summarise(before, wall)["codes"], "after_sigterm_codes": summarise(after, wall)["codes"]}
    srv.stop()
    result["sigterm"] = s
    print("sigterm", s, flush=True)


def scenario_soak(args, base: list[str], out: Path, result: dict) -> None:
    """--soak-rate x capacity for soak_s seconds: resident memory over time, with the server's count of live
    Python memory blocks (flat when the growth is native heap) and what its malloc_trim gave back."""
    srv = Server(args.engines, out / "logs", "soak", *base, "--max-queue-images", "64", *args.soak_server_args.split())
    samples = [(0.0, srv.rss_mb())]
    blocks, t0 = [], time.perf_counter()

    def sample(_i):
        now = time.perf_counter() - t0
        if now - samples[-1][0] >= 5:
            samples.append((now, srv.rss_mb()))
            text = srv.metrics()
            blocks.append((now, metric_sum(text, "aptp_python_allocated_blocks"),
                           metric_sum(text, "aptp_heap_trim_released_bytes_total") / 2**20))

    rate = args.soak_rate * _capacity(result)
    recs, wall = asyncio.run(open_loop(srv.url, rate, int(rate * args.soak_s * 1.2) + 10, args.steps, args.soak_s, seed=4,
                               on_tick=sample))
    samples.append((time.perf_counter() - t0, srv.rss_mb()))
    s = summarise(recs, wall)
    warm = [m for t, m in samples if t >= min(30.0, args.soak_s / 5)]
    s.update(rss_mb=samples, rss_start_mb=samples[0][1], rss_after_warm_mb=warm[0] if warm else None,
             rss_end_mb=samples[-1][1], rss_growth_vs_after_warm=(samples[-1][1] / warm[0] - 1) if warm else None,
             rss_growth_vs_start=samples[-1][1] / samples[0][1] - 1, rate_images_per_s=rate,
             python_blocks=[(t, b) for t, b, _ in blocks], trim_released_mb=blocks[-1][2] if blocks else None,
             server_args=args.soak_server_args)
    srv.stop()
    result["soak"] = s
    print("soak", {k: v for k, v in s.items() if k not in ("rss_mb", "python_blocks")}, flush=True)


def scenario_fairness(args, base: list[str], out: Path, result: dict) -> None:
    """Two n=8, steps=100 requests on expert 0, then light steps=2 requests on expert 1, one after another:
    the light ones must not wait for the heavy backlog of another expert (issue 22: served within 10 s)."""
    srv = Server(args.engines, out / "logs", "fairness", *base, "--max-steps", "100", "--max-queue-images", "64",
                 "--timeout-s", "600")

    async def go():
        async with httpx.AsyncClient(timeout=None) as client:
            heavy = [asyncio.ensure_future(client.post(srv.url + "/v1/images/generations", json={
                "prompt": PROMPTS[0], "model": "aptp:expert-0", "n": 8, "steps": 100, "seed": s})) for s in (1, 100)]
            await asyncio.sleep(2.0)  # the heavy images are in the lanes
            light = []
            for i in range(5):
                t0 = time.perf_counter()
                r = await client.post(srv.url + "/v1/images/generations", json={
                    "prompt": PROMPTS[1], "model": "aptp:expert-1", "steps": 2, "seed": i})
                d = r.json()["data"][0] if r.status_code == 200 else {}
                light.append({"code": r.status_code, "latency_s": time.perf_counter() - t0,
                              "queued_s": d.get("queued_s"), "heavy_done": sum(h.done() for h in heavy)})
            t0 = time.perf_counter()
            codes = [(await h).status_code for h in heavy]
            return light, codes, time.perf_counter() - t0

    light, heavy_codes, heavy_rest_s = asyncio.run(go())
    srv.stop()
    lat = [x["latency_s"] for x in light]
    result["fairness"] = {"light": light, "heavy_codes": heavy_codes, "heavy_finished_after_light_s": heavy_rest_s,
                          "light_latency_p50_s": float(np.median(lat)), "light_latency_max_s": max(lat),
                          "light_first_step_wait_p50_s": float(np.median([x["queued_s"] for x in light
                                                                          if x["queued_s"] is not None]))}
    print("fairness", {k: v for k, v in result["fairness"].items() if k != "light"}, flush=True)


def scenario_malformed(args, base: list[str], out: Path, result: dict) -> None:
    """The hostile corpus (benchmarks.hostile) over a real socket, on one pooled connection: every answer a JSON
    4xx in OpenAI's shape with the request id, none a 5xx or text/plain, and a good request after each one
    still served on the same pool (no connection closed under the client)."""
    srv = Server(args.engines, out / "logs", "malformed", *base, "--max-body-bytes", "65536")
    cases = corpus(max_body_bytes=65536)
    bad, codes = [], {}
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        for k, (path, body, headers) in enumerate(cases):
            r = client.post(path, content=body, headers={**headers, "X-Request-ID": f"hostile-{k}"})
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            shaped = (r.headers.get("content-type", "").startswith("application/json")
                      and r.headers.get("x-request-id") == f"hostile-{k}"
                      and set(_json_or_empty(r).get("error", {})) == {"message", "type", "param", "code"})
            if not (400 <= r.status_code < 500 and shaped):
                bad.append({"case": k, "path": path, "body": body[:80].decode("latin-1"), "code": r.status_code,
                            "content_type": r.headers.get("content-type"), "text": r.text[:200]})
        good = client.post("/v1/images/generations", json={"prompt": PROMPTS[0], "steps": 2}).status_code
    text = srv.metrics()
    s = {"requests": len(cases), "codes": codes, "not_openai_shaped_4xx": bad,
         "text_plain_500s": sum(1 for b in bad if b["code"] >= 500 and "text/plain" in (b["content_type"] or "")),
         "good_request_after": good, "readyz_after": httpx.get(srv.url + "/readyz").status_code,
         # /readyz answers 503 while warming up: count the 5xx of every other endpoint
         "server_5xx_in_metrics": sum(metric_sum(text, "aptp_requests_total", code=str(c)) for c in range(500, 505))
         - sum(metric_sum(text, "aptp_requests_total", code=str(c), endpoint="/readyz") for c in range(500, 505))}
    srv.stop()
    result["malformed"] = s
    print("malformed", {k: v for k, v in s.items() if k != "not_openai_shaped_4xx"}, "bad:", len(bad), flush=True)


def _json_or_empty(r) -> dict:
    try:
        d = r.json()
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def scenario_route_flood(args, base: list[str], out: Path, result: dict) -> None:
    """10 concurrent /v1/route requests of 64 prompts x 900 characters (the audit's flood): each gets 200 or a
    fast 503 within 60 s, the server's resident memory grows < 700 MB, and a flood whose clients leave stops."""
    srv = Server(args.engines, out / "logs", "route_flood", *base)
    body = {"prompt": [(f"{i} " + PROMPTS[i % len(PROMPTS)] + " ") * 60 for i in range(64)]}
    body["prompt"] = [p[:900] for p in body["prompt"]]
    rss = [srv.rss_mb()]

    async def flood(n: int, timeout: float | None):
        async def one(i):
            t0 = time.perf_counter()
            try:
                r = await client.post(srv.url + "/v1/route", json=body, timeout=timeout)
                return {"code": r.status_code, "latency_s": time.perf_counter() - t0,
                        "retry_after": r.headers.get("retry-after")}
            except httpx.TimeoutException:
                return {"code": "client_timeout", "latency_s": time.perf_counter() - t0}

        async def sample():
            while True:
                rss.append(srv.rss_mb())
                await asyncio.sleep(0.2)

        async with httpx.AsyncClient(timeout=None) as client:
            sampler = asyncio.ensure_future(sample())
            recs = await asyncio.gather(*[one(i) for i in range(n)])
            sampler.cancel()
        return recs

    rounds = []
    for r in range(3):  # three floods one after another: memory must not ratchet up
        t0 = time.perf_counter()
        recs = asyncio.run(flood(10, None))
        rounds.append({"codes": count_codes(x["code"] for x in recs), "wall_s": time.perf_counter() - t0,
                       "latency_max_s": max(x["latency_s"] for x in recs),
                       "latency_503_max_s": max([x["latency_s"] for x in recs if x["code"] == 503], default=None),
                       "every_503_has_retry_after": all(x.get("retry_after") for x in recs if x["code"] == 503)})
        print("route_flood round", r, rounds[-1], flush=True)
    # clients that leave after 0.3 s: the routing stops after the current chunk
    text0 = srv.metrics()
    asyncio.run(flood(10, 0.3))
    time.sleep(3.0)
    s = {"rounds": rounds, "rss_start_mb": rss[0], "rss_peak_mb": max(rss), "rss_end_mb": srv.rss_mb(),
         "rss_growth_peak_mb": max(rss) - rss[0],
         "routed_prompts_by_leavers": metric_sum(srv.metrics(), "aptp_routed_prompts_total", endpoint="/v1/route")
         - metric_sum(text0, "aptp_routed_prompts_total", endpoint="/v1/route"),
         "readyz_after": httpx.get(srv.url + "/readyz").status_code}
    srv.stop()
    result["route_flood"] = s
    print("route_flood", {k: v for k, v in s.items() if k != "rounds"}, flush=True)


def scenario_stalled(args, base: list[str], out: Path, result: dict) -> None:
    """20 connections that never finish (silent, half a header block, headers with half a body) and 4 idle
    keep-alive connections: each must be closed by the server within 60 s while /readyz stays 200."""
    srv = Server(args.engines, out / "logs", "stalled", *base)
    port = srv.port
    head = (b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
    kinds = ([("silent", b"")] * 6 + [("partial_headers", head)] * 7
             + [("partial_body", head + b"Content-Length: 1000\r\n\r\n{\"prompt\": \"a")] * 7
             + [("idle_keepalive", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")] * 4)
    ready_codes = []

    async def stall(kind: str, data: bytes) -> dict:
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if data:
            writer.write(data)
            await writer.drain()
        got = b""
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 90)
                if not chunk:
                    break
                got += chunk
        except (asyncio.TimeoutError, ConnectionError) as e:
            got += f" <{type(e).__name__}>".encode()
        writer.close()
        return {"kind": kind, "closed_after_s": time.perf_counter() - t0, "answer": got[:60].decode("latin-1")}

    async def probe(stop: asyncio.Event):
        async with httpx.AsyncClient(timeout=5) as client:
            while not stop.is_set():
                try:
                    ready_codes.append((await client.get(srv.url + "/readyz")).status_code)
                except httpx.HTTPError as e:
                    ready_codes.append(type(e).__name__)
                await asyncio.sleep(1.0)

    async def go():
        stop = asyncio.Event()
        prober = asyncio.ensure_future(probe(stop))
        recs = await asyncio.gather(*[stall(k, d) for k, d in kinds])
        stop.set()
        await prober
        return recs

    recs = asyncio.run(go())
    by_kind: dict = {}
    for r in recs:
        by_kind.setdefault(r["kind"], []).append(round(r["closed_after_s"], 2))
    s = {"connections": len(recs), "closed_after_s": by_kind, "max_closed_after_s": max(r["closed_after_s"] for r in recs),
         "answers": sorted({r["answer"][:40] for r in recs}), "readyz_codes": count_codes(ready_codes), "open_fds_after": _open_fds(srv.proc.pid)}
    srv.stop()
    result["stalled"] = s
    print("stalled", s, flush=True)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


SCENARIOS = {"capacity": scenario_capacity, "fairness": scenario_fairness, "poisson": scenario_poisson,
             "burst": scenario_burst, "disconnect": scenario_disconnect, "deadline": scenario_deadline,
             "sigterm": scenario_sigterm, "soak": scenario_soak, "malformed": scenario_malformed,
             "route_flood": scenario_route_flood, "stalled": scenario_stalled}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--requests", type=int, default=60, help="requests per measurement")
    ap.add_argument("--cap-s", type=float, default=90.0, help="time cap per measurement")
    ap.add_argument("--soak-s", type=float, default=300.0)
    ap.add_argument("--soak-rate", type=float, default=0.8, help="soak load as a fraction of measured capacity")
    ap.add_argument("--soak-server-args", default="",
                    help="extra `aptp serve` flags for the soak, e.g. '--trim-interval-s 0 --malloc-arenas 0'")
    ap.add_argument("--only", default="capacity,poisson,burst,disconnect,deadline,sigterm,soak",
                    help="scenarios, comma-separated: " + ", ".join(SCENARIOS))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    base = ["--workers", str(args.workers), "--threads", str(args.threads), "--max-batch", str(args.max_batch),
            "--default-steps", str(args.steps)]
    result = {"settings": vars(args), "machine": {**machine(), "cpus": os.cpu_count(),
                                                  "loadavg_start": os.getloadavg()}}
    path = out / "serve_load.json"

    if only & {"poisson", "soak", "deadline"}:
        only.add("capacity")  # they run at fractions of the measured capacity
    for name, scenario in SCENARIOS.items():
        if name in only:
            scenario(args, base, out, result)
            path.write_text(json.dumps(result, indent=1, default=str))
    result["machine"]["loadavg_end"] = os.getloadavg()
    path.write_text(json.dumps(result, indent=1, default=str))
    plot(result, out / "serve_load.png")
    return 0


def plot(result: dict, path: Path) -> None:
    poisson = result.get("poisson")
    if not poisson:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, s in poisson.items():
        for ax, field in zip(axes, ("latency_s", "queued_s"), strict=True):
            v = np.sort(s[field])
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=key, ls="-" if key.startswith("step") else "--")
    unet = poisson.get("step@0.5", {}).get("mean_unet_call_s")
    if unet:
        axes[1].axvline(unet, color="k", lw=0.8, label="one UNet call (mean)")
    axes[0].set(xlabel="request latency (s)", ylabel="CDF", title="latency, Poisson arrivals (x capacity)")
    axes[1].set(xlabel="wait until first UNet call (s)", xscale="symlog", title="queue wait per image")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
