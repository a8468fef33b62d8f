"""`aptp serve` on Ray Serve (engines/serving/ray.py): a real local Ray instance (2 CPUs, no dashboard,
127.0.0.1), the tiny 2-expert export deployed as an ingress + one deployment per expert, concurrent
requests through Ray's HTTP proxy get Runtime.generate's images bitwise; overfilling an expert's Ray
queue answers 503 + Retry-After (no hang, no 500). Skipped when Ray is not installed."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from engines_export_fixture import ANCHORS
from PIL import Image
from serve_testkit import free_port

from benchmarks.serve_load import metric_sum

from engines import Runtime
from engines.errors import EngineError
from engines.serving.config import ServeConfig

pytest.importorskip("ray.serve")
ray_serve = pytest.importorskip("engines.serving.ray")

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4


@pytest.fixture(scope="module")
def rt(pixel):
    return Runtime.load(pixel.dir, threads=1)


@pytest.fixture(scope="module")
def ray_app(pixel):
    """Deploy on a local Ray; yields the proxy's URL; shuts Serve and Ray down afterwards."""
    import ray
    from ray import serve

    port = free_port()
    # the ingress admits 12 images at once (the burst test below overfills it)
    config = ServeConfig(engines=str(pixel.dir), workers=1, threads=1, default_steps=STEPS, max_steps=400,
                         max_queue_images=12)
    # expert 1 takes one request at a time and queues two more in Ray: a fourth concurrent one is refused
    options = ray_serve.RayOptions(num_cpus=0.25, experts={"1": {"max_ongoing_requests": 1, "max_queued_requests": 2}})
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_serve.build_app(config, options), name=ray_serve.APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 120
        while httpx.get(url + "/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < end, "not ready after 120 s"
            time.sleep(0.2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_options_are_checked():
    with pytest.raises(EngineError, match="min_replicas"):
        ray_serve.RayOptions(min_replicas=3, max_replicas=2)
    with pytest.raises(EngineError, match="unknown 'workers'"):
        ray_serve.RayOptions(experts={"0": {"workers": 2}})
    config, options = ray_serve.split_args({"engines": "x", "max_batch": "4", "max_replicas": "3", "num_gpus": "0.5"})
    assert config.max_batch == 4 and options.max_replicas == 3 and options.num_gpus == 0.5
    opts = ray_serve.expert_deployment_options(config, options, 1)
    assert opts["name"] == "expert-1" and opts["ray_actor_options"]["num_gpus"] == 0.5
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4.0}
    assert opts["max_ongoing_requests"] == 8 and opts["max_queued_requests"] == config.expert_queue_limit
    with pytest.raises(EngineError, match="unknown setting 'bogus'"):
        ray_serve.split_args({"engines": "x", "bogus": 1})


def test_cli_ray_flags(monkeypatch):
    from aptp.cli import build_parser

    seen = {}
    monkeypatch.setattr(ray_serve, "serve_on_ray", lambda config, options: seen.update(c=config, o=options) or 0)
    args = build_parser("serve").parse_args(["serve", "--export", "x", "--ray", "--ray-max-replicas", "3",
                                             "--ray-num-gpus", "0.5"])
    assert args._run(args) == 0
    assert seen["c"].engines == "x" and seen["o"].max_replicas == 3 and seen["o"].num_gpus == 0.5


@pytest.mark.slow  # about 60 s on 2 cores: Ray's start and the deployment take most of it
def test_ray_serve_images_equal_runtime_and_full_queue_answers_503(ray_app, rt):
    url = ray_app
    models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == ["aptp", "aptp:expert-0", "aptp:expert-1"]
    routed = httpx.post(url + "/v1/route", json={"prompt": list(ANCHORS)}, timeout=30).json()["data"]
    assert [d["expert"] for d in routed] == [0, 1]
    bad = httpx.post(url + "/v1/images/generations", json={"prompt": "x", "n": 0}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"

    # concurrent requests to both expert deployments, two images each
    jobs = [(ANCHORS[i % 2], 10 + i) for i in range(6)]

    def call(job):
        prompt, seed = job
        return httpx.post(url + "/v1/images/generations", timeout=120,
                          json={"prompt": prompt, "n": 2, "seed": seed, "steps": STEPS}), job

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(call, jobs))
    for r, (prompt, seed) in answers:
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["seed"] for d in data] == [seed, seed + 1]
        assert data[0]["model"] == f"aptp:expert-{ANCHORS.index(prompt)}"
        ref = rt.generate([prompt, prompt], steps=STEPS, seed=seed)
        assert all(np.array_equal(_png(d["b64_json"]), np.asarray(im)) for d, im in zip(data, ref, strict=True))

    # expert 1: one request running and two queued in Ray; the others are refused at once with 503
    def long_call(i):
        return httpx.post(url + "/v1/images/generations", timeout=120,
                          json={"prompt": ANCHORS[1], "seed": i, "steps": 300})

    t = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(long_call, range(8)))
    statuses = sorted(r.status_code for r in codes)
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 3, statuses
    refused = [r for r in codes if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "expert_queue_full" for r in refused)
    print(f"overfill: statuses {statuses} in {time.monotonic() - t:.1f} s")
    # expert 0 is unaffected meanwhile, and the service still answers after the burst
    r = httpx.post(url + "/v1/images/generations", json={"prompt": ANCHORS[0], "seed": 3, "steps": STEPS}, timeout=60)
    assert r.status_code == 200
    assert np.array_equal(_png(r.json()["data"][0]["b64_json"]), np.asarray(rt.generate(ANCHORS[0], steps=STEPS, seed=3)[0]))


@pytest.mark.slow  # part of the Ray module above: one deployment for both tests
def test_ray_ingress_burst_is_refused_before_routing_and_metrics_show_the_replicas(ray_app):
    """Issue 22: 24 concurrent requests against an ingress that admits 12 images: the rest get a fast 503
    queue_full before any routing (the ingress's routed-prompt counter grows by the admitted ones only), and
    the ingress's /metrics carries every expert replica's own metrics (aptp_replica_*)."""
    url = ray_app
    gen = "/v1/images/generations"
    before = httpx.get(url + "/metrics", timeout=30).text

    def call(i):
        t = time.monotonic()
        r = httpx.post(url + gen, json={"prompt": ANCHORS[0], "seed": i, "steps": 400}, timeout=120)
        return r, time.monotonic() - t

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(call, range(24)))
    codes = sorted(r.status_code for r, _ in answers)
    refused = [(r, s) for r, s in answers if r.status_code == 503 and r.json()["error"]["code"] == "queue_full"]
    assert set(codes) <= {200, 503} and len(refused) >= 6, codes
    assert all(r.headers["retry-after"] == "1" for r, _ in refused)
    slowest_refusal = max(s for _, s in refused)
    fastest_image = min(s for r, s in answers if r.status_code == 200)
    assert slowest_refusal < fastest_image, (slowest_refusal, fastest_image)
    after = httpx.get(url + "/metrics", timeout=30).text
    routed = (metric_sum(after, "aptp_routed_prompts_total", endpoint=gen)
              - metric_sum(before, "aptp_routed_prompts_total", endpoint=gen))
    assert routed == 24 - len(refused), (routed, len(refused))
    assert (metric_sum(after, "aptp_rejections_total", reason="queue_full")
            - metric_sum(before, "aptp_rejections_total", reason="queue_full")) == len(refused)
    # the replicas' own counters, seen through the ingress: expert 0 made every image admitted just now
    made = (metric_sum(after, "aptp_replica_images_total", deployment="aptp:expert-0")
            - metric_sum(before, "aptp_replica_images_total", deployment="aptp:expert-0"))
    assert made == codes.count(200), (made, codes)
    for model in ("aptp:expert-0", "aptp:expert-1"):
        assert f'aptp_replica_scrape_ok{{deployment="{model}"}} 1.0' in after
        assert metric_sum(after, "aptp_replica_process_resident_memory_bytes", deployment=model) > 1e7
    print(f"ingress burst: {codes.count(200)} admitted, {len(refused)} refused within {slowest_refusal:.2f} s "
          f"(first image after {fastest_image:.2f} s)")

