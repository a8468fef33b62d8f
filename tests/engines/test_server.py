"""`aptp serve` over HTTP: the official openai client gets Runtime.generate's images bitwise from a real
server process run without torch (both policies); OpenAI-shaped errors; 401/503/504; readiness; metrics;
request ids; client disconnects cancelling work; SIGTERM draining."""

from __future__ import annotations

import base64
import io
import re
import threading
import time

import httpx
import numpy as np
import pytest
from engines_export_fixture import ANCHORS
from PIL import Image
from serve_testkit import running_server
from starlette.testclient import TestClient

from benchmarks.hostile import corpus
from engines import Runtime
from engines.serving import batching as batching_mod
from engines.serving.batching import Batcher
from engines.serving.config import ServeConfig
from engines.serving.http import create_app
from engines.stepping import unet_step

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rt(pixel):
    return Runtime.load(pixel.dir, threads=1)


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.mark.parametrize("policy", ["request", "step"])
def test_openai_client_gets_runtime_images(pixel, rt, policy):
    from openai import OpenAI

    prompt = ANCHORS[1]
    ref = [np.asarray(im) for im in rt.generate([prompt, prompt], steps=4, seed=1)]
    with running_server(pixel.dir, "--batching", policy, "--default-steps", "4") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        res = client.images.generate(model="aptp", prompt=prompt, n=2, response_format="b64_json",
                                     extra_body={"seed": 1})
        assert [d.seed for d in res.data] == [1, 2]
        assert [d.expert for d in res.data] == [1, 1] and res.data[0].model == "aptp:expert-1"
        got = [_png(d.b64_json) for d in res.data]
        assert all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True))
        forced = client.images.generate(model="aptp:expert-0", prompt=prompt, response_format="b64_json",
                                        extra_body={"seed": 1})
        assert forced.data[0].expert == 0
        assert np.array_equal(_png(forced.data[0].b64_json), np.asarray(rt.generate(prompt, steps=4, seed=1, expert=0)[0]))
        rescaled = client.images.generate(model="aptp", prompt=prompt, response_format="b64_json",
                                          extra_body={"seed": 1, "guidance_rescale": 0.7})
        ref_rescaled = np.asarray(rt.generate(prompt, steps=4, seed=1, guidance_rescale=0.7)[0])
        assert np.array_equal(_png(rescaled.data[0].b64_json), ref_rescaled)
        assert not np.array_equal(ref_rescaled, ref[0])  # the request field reached the step function
        assert not any("torch" in line.get("event", "") for line in server.log_lines())


@pytest.fixture
def app_client(rt):
    """An in-process app (TestClient) with its own Batcher; yields (client, batcher)."""
    clients = []

    def make(**settings):
        cfg = ServeConfig(**{"default_steps": 3, **settings})
        batcher = Batcher(rt, cfg)
        client = TestClient(create_app(batcher, cfg), base_url="http://127.0.0.1", raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        end = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.02)
        return client, batcher

    yield make
    for c in clients:
        c.__exit__(None, None, None)


JSON = {"Content-Type": "application/json"}


def _error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    return err


def test_bad_requests_answer_400_naming_the_field(app_client):
    client, _ = app_client(max_n=4, max_prompt_chars=50, max_body_bytes=2000)
    post = lambda body: client.post("/v1/images/generations", json=body)  # noqa: E731
    _error(post({"prompt": "x", "n": 5}), 400, "n")
    _error(post({"prompt": "x", "n": "2"}), 400, "n")
    _error(post({"prompt": "x" * 51}), 400, "prompt")
    _error(post({"n": 1}), 400, "prompt")
    _error(post({"prompt": "   "}), 400, "prompt")
    _error(post({"prompt": "x", "steps": 101}), 400, "steps")
    _error(post({"prompt": "x", "size": "1024x1024"}), 400, "size")
    assert "b64_json" in _error(post({"prompt": "x", "response_format": "url"}), 400, "response_format")["message"]
    _error(post({"prompt": "x", "output_format": "gif"}), 400, "output_format")
    _error(post({"prompt": "x", "model": "dall-e-3"}), 400, "model")
    _error(post({"prompt": "x", "model": "aptp:expert-9"}), 400, "model")
    _error(post({"prompt": "x", "model": "aptp:dense"}), 400, "model")  # exported without the dense model
    _error(post({"prompt": "x", "scheduler": "lms"}), 400, "scheduler")
    _error(post({"prompt": "x", "guidance_scale": "high"}), 400, "guidance_scale")
    _error(post({"prompt": "x", "guidance_scale": 101}), 400, "guidance_scale")
    _error(post({"prompt": "x", "guidance_rescale": 1.5}), 400, "guidance_rescale")
    _error(post({"prompt": "x", "guidance_rescale": "yes"}), 400, "guidance_rescale")
    _error(post({"prompt": "x", "seed": -1}), 400, "seed")
    _error(post({"prompt": "x", "colour": "red"}), 400, "colour")
    _error(post({"prompt": "x", "stream": True}), 400, "stream")
    _error(client.post("/v1/images/generations", content=b"{not json", headers=JSON), 400, "body")
    _error(post({"prompt": "x", "user": "u" * 3000}), 413, "body")
    _error(client.get("/v1/nothing"), 404)


def test_hostile_and_broken_requests_always_get_openai_shaped_json(app_client, rt):
    """Issue 22: no request may produce a text/plain 500: every one is answered in OpenAI's error shape with
    the request id; strict types, bounded integers, bounded depth, valid Unicode, 413/415/405/404."""
    client, _ = app_client(max_steps=10, default_steps=2, max_body_bytes=65536)
    cases = corpus(max_body_bytes=65536)
    for path, body, headers in cases:
        r = client.post(path, content=body, headers={**headers, "X-Request-ID": "hostile"})
        assert 400 <= r.status_code < 500, (path, body[:80], r.status_code, r.text[:300])
        assert r.headers["content-type"].startswith("application/json") and r.headers["x-request-id"] == "hostile"
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and len(err["message"]) <= 400
    assert len(cases) >= 200
    # the lone surrogate names its field; PNDM with its warm-up needs 4 steps: a 400 naming steps
    r = client.post("/v1/images/generations", content=b'{"prompt": "\\ud800"}',
                    headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    if not rt.manifest.scheduler.config.get("skip_prk_steps", False):
        _error(client.post("/v1/images/generations", json={"prompt": "x", "scheduler": "pndm", "steps": 2}), 400, "steps")
    r = client.put("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["error"]["type"]
    assert client.head("/healthz").status_code == 200 and client.head("/readyz").status_code == 200
    # a Host that is not this loopback server's (DNS rebinding from a web page): refused
    _error(client.post("/v1/images/generations", json={"prompt": "x"}, headers={"Host": "evil.example"}), 403)


def _denoising_in_background(server, body: dict, headers: dict | None = None):
    """POST `body` from a thread and return (thread, results) once the server reports it denoising."""
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("r", httpx.post(
        server.url + "/v1/images/generations", json=body, headers=headers or {}, timeout=60)))
    worker.start()
    deadline = time.monotonic() + 60
    while not re.search(r'aptp_active_images\{expert="\d+"\} [1-9]', httpx.get(server.url + "/metrics").text):
        assert worker.is_alive(), results["r"].text  # the request must still be running
        assert time.monotonic() < deadline, "the request never started denoising"
        time.sleep(0.02)
    return worker, results


def test_work_a_drain_cuts_off_is_answered_503_json(pixel):
    """Issue 22: SIGTERM during a request that outlives --drain-timeout-s: the client gets a JSON 503 with
    Retry-After (retry elsewhere), not uvicorn's text/plain 500, and the process still exits in time."""
    with running_server(pixel.dir, "--workers", "1", "--drain-timeout-s", "2", "--max-steps", "1000") as server:
        worker, results = _denoising_in_background(server, {"prompt": ANCHORS[0], "steps": 900, "n": 4},
                                                   {"X-Request-ID": "cut"})
        t0 = time.monotonic()
        server.sigterm()
        worker.join(30)
        r = results["r"]
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.headers["x-request-id"] == "cut"
        assert r.json()["error"]["code"] == "cancelled"
        assert server.proc.wait(20) == 0 and time.monotonic() - t0 < 10


def test_generation_options_and_request_id(app_client, rt):
    client, _ = app_client()
    r = client.post("/v1/images/generations", headers={"X-Request-ID": "req-42"},
                    json={"prompt": ANCHORS[0], "size": "16x16", "output_format": "jpeg", "seed": 7, "steps": 2,
                          "guidance_scale": 1.0, "scheduler": "euler", "user": "ignored"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "req-42" and r.json()["request_id"] == "req-42"
    d = r.json()["data"][0]
    assert (d["seed"], d["expert"], r.json()["output_format"]) == (7, 0, "jpeg")
    assert Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).format == "JPEG"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32  # generated when absent
    no_seed = client.post("/v1/images/generations", json={"prompt": ANCHORS[0]}).json()["data"][0]
    assert isinstance(no_seed["seed"], int)  # a random seed, reported


def test_route_models_health_metrics(app_client, rt):
    client, _ = app_client()
    r = client.post("/v1/route", json={"prompt": list(ANCHORS)}).json()["data"]
    assert [d["expert"] for d in r] == [0, 1] and len(r[0]["scores"]) == 2
    _error(client.post("/v1/route", json={"prompt": []}), 400, "prompt")
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert models == ["aptp", "aptp:expert-0", "aptp:expert-1"]
    assert client.get("/healthz").json() == {"status": "alive"}
    client.post("/v1/images/generations", json={"prompt": ANCHORS[1]})
    text = client.get("/metrics").text
    for name in ("aptp_requests_total", "aptp_request_seconds", "aptp_queue_wait_seconds", "aptp_queued_images",
                 "aptp_active_images", "aptp_batch_size_images", "aptp_unet_call_seconds", "aptp_images_total",
                 "aptp_rejections_total", "aptp_cancellations_total", "aptp_cancel_release_seconds", "aptp_ready"):
        assert name in text, name
    assert 'aptp_images_total{expert="1"} 1.0' in text and "aptp_ready 1.0" in text
    assert 'aptp_requests_total{code="200",endpoint="/v1/route"} 1.0' in text


def test_api_key(app_client):
    client, _ = app_client(api_key="s3cret")
    _error(client.get("/v1/models"), 401)
    _error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/readyz").status_code == 200 and client.get("/healthz").status_code == 200


def test_not_ready_until_warm(rt):
    cfg = ServeConfig()
    batcher = Batcher(rt, cfg)
    with TestClient(create_app(batcher, cfg, warm_up=False), base_url="http://127.0.0.1") as client:
        assert client.get("/readyz").status_code == 503
        err = _error(client.post("/v1/images/generations", json={"prompt": "x"}), 503)
        assert err["code"] == "not_ready"
        assert client.get("/healthz").status_code == 200
        batcher.warm_up()
        assert client.get("/readyz").status_code == 200


def test_full_queue_answers_503_with_retry_after_and_deadline_504(app_client, monkeypatch):
    client, batcher = app_client(workers=1, max_batch=1, max_queue_images=2, timeout_s=2.0)
    gate = threading.Event()

    def gated(unet, states):
        gate.wait(30)
        unet_step(unet, states)

    monkeypatch.setattr(batching_mod, "unet_step", gated)  # after warm-up: UNet calls now wait for the gate
    out = {}

    def call(i, n):
        out[i] = client.post("/v1/images/generations", json={"prompt": ANCHORS[0], "n": n})

    running = threading.Thread(target=call, args=("running", 1))
    running.start()
    while batcher.stats()["active"][0] < 1:
        time.sleep(0.01)
    waiting = threading.Thread(target=call, args=("waiting", 2))
    waiting.start()
    while batcher.stats()["queued"][0] < 2:
        time.sleep(0.01)
    r = client.post("/v1/images/generations", json={"prompt": ANCHORS[0]})
    assert _error(r, 503)["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
    running.join(10)
    waiting.join(10)
    assert _error(out["running"], 504)["code"] == "deadline_exceeded"
    assert _error(out["waiting"], 504)["code"] == "deadline_exceeded"
    assert batcher.stats()["queued"][0] == 0
    gate.set()
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").text
    assert 'aptp_rejections_total{reason="queue_full"} 1.0' in metrics
    assert 'aptp_cancellations_total{reason="deadline"} 2.0' in metrics


def test_disconnect_cancels_and_sigterm_drains(pixel):
    with running_server(pixel.dir, "--workers", "1", "--drain-timeout-s", "20", "--max-steps", "1000") as server:
        body = {"prompt": ANCHORS[0], "n": 2, "steps": 900}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/images/generations", json=body, timeout=0.5)
        end = time.monotonic() + 10
        metrics = ""
        while 'aptp_cancellations_total{reason="disconnect"} 1.0' not in metrics and time.monotonic() < end:
            time.sleep(0.05)
            metrics = httpx.get(server.url + "/metrics").text
        assert 'aptp_cancellations_total{reason="disconnect"} 1.0' in metrics
        # both images left their batch with at most the UNet call in flight finishing after the drop
        assert 'aptp_cancel_release_unet_calls_bucket{le="1.0",reason="disconnect"} 2.0' in metrics
        assert 'aptp_active_images{expert="0"} 0.0' in metrics

        worker, results = _denoising_in_background(server, {"prompt": ANCHORS[0], "steps": 300, "seed": 3})
        t0 = time.monotonic()
        server.sigterm()
        time.sleep(0.3)
        assert httpx.get(server.url + "/readyz").status_code == 503
        late = httpx.post(server.url + "/v1/images/generations", json={"prompt": ANCHORS[0]})
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        worker.join(60)
        assert results["r"].status_code == 200 and len(results["r"].json()["data"]) == 1
        assert server.proc.wait(25) == 0
        assert time.monotonic() - t0 < 20
        events = [line.get("event") for line in server.log_lines()]
        assert "draining" in events and "drained" in events
