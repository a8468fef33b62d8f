"""The HTTP face of the runtime (`aptp serve`): FastAPI + uvicorn over `engines.batching.Batcher`.

Endpoints (docs/serving.md has examples):
- POST /v1/images/generations  OpenAI Images API: prompt, n, size ("auto" or the export's), response_format
  (b64_json), output_format (png|jpeg|webp), output_compression, model ("aptp" routes, "aptp:expert-K" /
  "aptp:dense" force one model); extensions seed, steps, guidance_scale, scheduler. Each data item also
  carries its expert, model, seed and timings. Errors in OpenAI's shape {"error": {message, type, param,
  code}}: 400 bad input (param names the field), 401 bad key, 503 + Retry-After (queue full, not ready,
  draining), 504 (deadline passed).
- POST /v1/route  {"prompt": str | [str]} -> expert, MACs fraction and router scores per prompt.
- GET /v1/models  "aptp" and one model per expert (MACs fraction, share) and "aptp:dense".
- GET /healthz (alive) · GET /readyz (200 once every session ran once; 503 while warming up or draining)
- GET /metrics (Prometheus text).

Every response carries X-Request-ID (the client's, or a new one); one JSON log line per request.
SIGTERM: readiness and new requests answer 503, admitted work finishes for up to drain_timeout_s, then
the process exits. FastAPI, uvicorn and prometheus-client are the `serving` extra, imported here only.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import math
import re
import secrets
import signal
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager

from .batching import Batcher, BatchObserver
from .denoise import SEED_MAX
from .errors import (
    BackendError,
    DeadlineExceededError,
    EngineError,
    PromptError,
    RequestCancelledError,
    UnavailableError,
)
from .runtime import Runtime
from .schedulers import SCHEDULERS
from .serve_config import ServeConfig
from .tokenization import clean_prompts

try:  # the one place the serving extra is imported
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import MutableHeaders
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _e:  # pragma: no cover - exercised by the torch-free test's environment
    raise BackendError(f'`aptp serve` needs fastapi, uvicorn and prometheus-client ({_e}): '
                       'pip install "aptp[serve]"') from None

log = logging.getLogger("aptp.serve")

OPEN_PATHS = ("/healthz", "/readyz")  # answered without the API key (probes)
ENDPOINTS = ("/v1/images/generations", "/v1/route", "/v1/models", "/healthz", "/readyz", "/metrics")
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
IGNORED_FIELDS = ("user", "quality", "style", "moderation", "background", "safety_identifier")
GENERATION_FIELDS = ("prompt", "model", "n", "size", "response_format", "output_format", "output_compression",
                     "stream", "seed", "steps", "guidance_scale", "scheduler", *IGNORED_FIELDS)
MAX_ROUTE_PROMPTS = 64
_MODEL = re.compile(r"^aptp(?::(?:expert-(\d+)|(dense)))?$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 503: "server_error", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# -- metrics ---------------------------------------------------------------------------------------
class ServerMetrics(BatchObserver):
    """Prometheus metrics of one server (its own registry, so tests can build several)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("aptp_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.request_seconds = Histogram("aptp_request_seconds", "HTTP request duration", ["endpoint"],
                                         buckets=SECONDS_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("aptp_queue_wait_seconds", "submission to an image's first UNet call",
                                    ["expert"], buckets=SECONDS_BUCKETS, registry=r)
        self.queued = Gauge("aptp_queued_images", "images waiting to start", ["expert"], registry=r)
        self.active = Gauge("aptp_active_images", "images being denoised", ["expert"], registry=r)
        self.batch_size = Histogram("aptp_batch_size_images", "images per UNet call", ["expert"],
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.unet_seconds = Histogram("aptp_unet_call_seconds", "duration of one UNet call", ["expert"],
                                      buckets=SECONDS_BUCKETS, registry=r)
        self.images = Counter("aptp_images_total", "images generated", ["expert"], registry=r)
        self.rejections = Counter("aptp_rejections_total", "requests refused at admission", ["reason"], registry=r)
        self.cancellations = Counter("aptp_cancellations_total", "requests dropped after admission", ["reason"],
                                     registry=r)
        self.release_seconds = Histogram("aptp_cancel_release_seconds",
                                         "drop of a request to its images leaving the queue or their batch",
                                         ["reason"], buckets=SECONDS_BUCKETS, registry=r)
        self.release_calls = Histogram("aptp_cancel_release_unet_calls",
                                       "UNet calls including an image that ended after its request was dropped",
                                       ["reason"], buckets=(0, 1, 2, 5), registry=r)
        self.ready = Gauge("aptp_ready", "1 when ready to serve", registry=r)

    def queue_wait(self, expert, seconds):
        self.queue_wait_seconds.labels(str(expert)).observe(seconds)

    def unet_call(self, expert, images, seconds):
        self.batch_size.labels(str(expert)).observe(images)
        self.unet_seconds.labels(str(expert)).observe(seconds)

    def image_done(self, expert):
        self.images.labels(str(expert)).inc()

    def rejected(self, reason):
        self.rejections.labels(reason).inc()

    def cancelled(self, reason):
        self.cancellations.labels(reason).inc()

    def released(self, reason, seconds, calls_after):
        self.release_seconds.labels(reason).observe(seconds)
        self.release_calls.labels(reason).observe(calls_after)

    def refresh(self, batcher: Batcher) -> None:
        stats = batcher.stats()
        for e in batcher.experts:
            self.queued.labels(str(e)).set(stats["queued"][e])
            self.active.labels(str(e)).set(stats["active"][e])
        self.ready.set(1 if stats["ready"] and stats["accepting"] else 0)


# -- logging ---------------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event and the record's `fields`."""

    def format(self, record):
        d = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
             "level": record.levelname.lower(), "event": record.getMessage()}
        d.update(getattr(record, "fields", {}))
        if record.exc_info:
            d["exception"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


def configure_logging(stream=None) -> None:
    """JSON lines on stderr for aptp.serve and uvicorn's own loggers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("aptp.serve", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(logging.INFO)
        lg.propagate = False


def _log(event: str, level=logging.INFO, **fields) -> None:
    log.log(level, event, extra={"fields": fields})


# -- the middleware: request id, API key, metrics, access log -------------------------------------
class RequestContext:
    """Pure ASGI middleware (no BaseHTTPMiddleware: the handlers must see the client's disconnect)."""

    def __init__(self, app, api_key: str, metrics: ServerMetrics):
        self.app = app
        self.api_key = api_key.encode()
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["log"] = {}
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]
        start = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        try:
            if self.api_key and path not in OPEN_PATHS and not self._authorised(headers.get("authorization", "")):
                err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
                await err.response()(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.request_seconds.labels(endpoint).observe(seconds)
            _log("request", request_id=rid, method=scope["method"], path=path, status=status[0],
                 seconds=round(seconds, 4), client=(scope.get("client") or ("", 0))[0], **state["log"])

    def _authorised(self, value: str) -> bool:
        scheme, _, token = value.partition(" ")
        # compare_digest on bytes of possibly different lengths is still constant-time in the key
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)


# -- request parsing -------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object body (at most `limit` bytes), else ApiError 400 naming `body`."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(400, f"request body is {length} bytes, more than the {limit} accepted", param="body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(400, f"request body is more than the {limit} bytes accepted", param="body")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON", param="body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", param="body")
    return data


def _integer(d: dict, key: str, default, lo: int, hi: int):
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"{key} must be an integer from {lo} to {hi}, got {v!r}", param=key)
    return v


def parse_model(model) -> int | str | None:
    """'aptp' -> None (route), 'aptp:expert-3' -> 3, 'aptp:dense' -> 'dense'; else ApiError naming `model`."""
    m = _MODEL.match(model) if isinstance(model, str) else None
    if m is None:
        raise ApiError(400, f"model {model!r} is not served here: use 'aptp' (routed), 'aptp:expert-K' or "
                            "'aptp:dense' (see GET /v1/models)", param="model", code="model_not_found")
    if m.group(1) is not None:
        return int(m.group(1))
    return "dense" if m.group(2) else None


def parse_generation(d: dict, cfg: ServeConfig, image_size) -> dict:
    """Check a /v1/images/generations body; returns the Batcher.submit arguments and output options."""
    unknown = [k for k in d if k not in GENERATION_FIELDS]
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}", param=unknown[0])
    prompt = d.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt is required and must be a string", param="prompt")
    if len(prompt) > cfg.max_prompt_chars:
        raise ApiError(400, f"prompt has {len(prompt)} characters, more than the {cfg.max_prompt_chars} accepted",
                       param="prompt")
    if d.get("stream"):
        raise ApiError(400, "streaming is not supported: send stream=false", param="stream")
    expert = parse_model(d.get("model") or "aptp")
    n = _integer(d, "n", 1, 1, cfg.max_n)
    size = d.get("size") or "auto"
    w, h = image_size
    if size not in ("auto", f"{w}x{h}"):
        raise ApiError(400, f"size {size!r} is not available: this export makes {w}x{h} images (or say 'auto')",
                       param="size")
    rf = d.get("response_format") or "b64_json"
    if rf != "b64_json":
        raise ApiError(400, f"response_format {rf!r} is not supported: this server returns images inline, "
                            "use 'b64_json'", param="response_format")
    fmt = d.get("output_format") or "png"
    if fmt not in OUTPUT_FORMATS:
        raise ApiError(400, f"output_format {fmt!r}: choose from {', '.join(OUTPUT_FORMATS)}", param="output_format")
    quality = _integer(d, "output_compression", 100, 0, 100)
    seed = _integer(d, "seed", None, 0, SEED_MAX - cfg.max_n)
    if seed is None:
        seed = secrets.randbits(31)
    steps = _integer(d, "steps", cfg.default_steps, 1, cfg.max_steps)
    g = d.get("guidance_scale", cfg.default_guidance_scale)
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0 <= g <= 100:
        raise ApiError(400, f"guidance_scale must be a number from 0 to 100, got {g!r}", param="guidance_scale")
    sched = d.get("scheduler")
    if sched is not None and (not isinstance(sched, str) or sched.lower() not in SCHEDULERS):
        raise ApiError(400, f"scheduler {sched!r}: choose from {', '.join(SCHEDULERS)}", param="scheduler")
    return {"submit": {"prompt": prompt, "n": n, "seed": seed, "steps": steps, "guidance_scale": float(g),
                       "scheduler": sched.lower() if sched else None, "expert": expert},
            "format": fmt, "quality": quality, "size": f"{w}x{h}"}


def _param_of(message: str) -> str | None:
    """The request field an EngineError message is about (the core's messages start with it)."""
    for key, param in (("prompt", "prompt"), ("n:", "n"), ("steps", "steps"), ("guidance_scale", "guidance_scale"),
                       ("seed", "seed"), ("unknown scheduler", "scheduler"), ("expert", "model"), ("model", "model")):
        if message.startswith(key):
            return param
    return None


def encode_image(image, fmt: str, quality: int) -> str:
    """base64 of the image in `fmt` (png lossless; jpeg/webp at `quality`)."""
    buf = io.BytesIO()
    kwargs = {} if fmt == "png" else {"quality": quality}
    image.save(buf, format=OUTPUT_FORMATS[fmt], **kwargs)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def model_id(expert) -> str:
    return "aptp:dense" if expert == "dense" else f"aptp:expert-{expert}"



def submit_error(e: EngineError) -> ApiError:
    """The answer to an error raised at submission: 503 + Retry-After when unavailable, else 400."""
    if isinstance(e, UnavailableError):
        return ApiError(503, str(e), code=e.reason, retry_after=int(math.ceil(e.retry_after_s)))
    return ApiError(400, str(e), param=_param_of(str(e)))


def result_error(e: EngineError) -> ApiError:
    """The answer to an error that ended an admitted request: 504 deadline, 503 cancelled, else 500."""
    if isinstance(e, DeadlineExceededError):
        return ApiError(504, str(e), code="deadline_exceeded")
    if isinstance(e, RequestCancelledError):
        return ApiError(503, str(e), code="cancelled", retry_after=1)
    return ApiError(500, str(e), code="generation_failed")


def image_item(b64: str, prompt: str, r) -> dict:
    """One data item of a generation response (r: an ImageResult, or a dict with the same fields)."""
    get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    return {"b64_json": b64, "revised_prompt": prompt, "expert": get("expert"), "model": model_id(get("expert")),
            "seed": get("seed"), "queued_s": round(get("queued_s"), 6), "seconds": round(get("seconds"), 6),
            "unet_calls": get("unet_calls")}


def generation_body(data: list[dict], fmt: str, size: str, request_id: str) -> dict:
    return {"created": int(time.time()), "data": data, "output_format": fmt, "size": size, "request_id": request_id}


def parse_route(d: dict, config: ServeConfig) -> list[str]:
    """Check a /v1/route body; returns its cleaned prompts (ApiError 400 naming the field otherwise)."""
    unknown = [k for k in d if k != "prompt"]
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}", param=unknown[0])
    prompts = d.get("prompt")
    if isinstance(prompts, list) and len(prompts) > MAX_ROUTE_PROMPTS:
        raise ApiError(400, f"prompt: {len(prompts)} prompts, at most {MAX_ROUTE_PROMPTS}", param="prompt")
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, list) and any(isinstance(p, str) and len(p) > config.max_prompt_chars for p in prompts):
        raise ApiError(400, f"prompt longer than the {config.max_prompt_chars} characters accepted", param="prompt")
    try:
        return clean_prompts(prompts)
    except PromptError as e:
        raise ApiError(400, str(e), param="prompt") from None


def route_body(manifest, prompts: list[str], res) -> dict:
    data = [{"index": i, "prompt": p, "expert": e, "model": model_id(e),
             "macs_fraction": manifest.expert(e).macs_fraction, "scores": [float(s) for s in res.scores[i]]}
            for i, (p, e) in enumerate(zip(prompts, res.expert_ids, strict=True))]
    return {"object": "list", "data": data}


def models_body(manifest) -> dict:
    data = [{"id": "aptp", "object": "model", "created": 0, "owned_by": "aptp", "routed": True,
             "base_model": manifest.base_model, "experts": len(manifest.experts)}]
    for e in manifest.experts:
        data.append({"id": model_id(e.id), "object": "model", "created": 0, "owned_by": "aptp", "expert": e.id,
                     "macs_fraction": e.macs_fraction, "share": e.share, "params": e.params})
    if manifest.dense is not None:
        data.append({"id": "aptp:dense", "object": "model", "created": 0, "owned_by": "aptp", "expert": "dense",
                     "macs_fraction": 1.0})
    return {"object": "list", "data": data}


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped answers for ApiError and for Starlette's own 404/405."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return ApiError(exc.status_code, str(exc.detail)).response()


# -- the app ---------------------------------------------------------------------------------------
def create_app(batcher: Batcher, config: ServeConfig, warm_up: bool = True) -> FastAPI:
    """The FastAPI app over a Batcher (started, and warmed up in a thread, by the app's lifespan).
    The Batcher's observer becomes the app's ServerMetrics unless it already is one."""
    if not isinstance(batcher.observer, ServerMetrics):
        batcher.observer = ServerMetrics()
    metrics = batcher.observer
    rt = batcher.runtime
    manifest = rt.manifest

    def _warm():
        t = time.perf_counter()
        try:
            batcher.warm_up()
        except Exception as e:
            _log("warm_up_failed", logging.ERROR, error=str(e))
            return
        _log("ready", seconds=round(time.perf_counter() - t, 3), experts=len(batcher.experts),
             image_size=list(batcher.image_size), settings=config.to_dict())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        if warm_up:
            threading.Thread(target=_warm, name="aptp-warm-up", daemon=True).start()
        yield
        await run_in_threadpool(batcher.close, 0.0)

    app = FastAPI(title="aptp serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.config = config

    install_error_handlers(app)

    def _check_ready():
        if not batcher.accepting:
            metrics.rejected("draining")
            raise ApiError(503, "the server is shutting down", code="draining", retry_after=1)
        if not batcher.ready:
            metrics.rejected("not_ready")
            raise ApiError(503, "the server is warming up", code="not_ready", retry_after=1)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        _check_ready()
        args = parse_generation(await read_json(request, config.max_body_bytes), config, batcher.image_size)
        rid = request.scope["state"]["request_id"]
        try:
            ticket = await run_in_threadpool(batcher.submit, **args["submit"], request_id=rid)
        except EngineError as e:
            raise submit_error(e) from None
        request.scope["state"]["log"].update(expert=str(ticket.expert), images=ticket.n, seed=ticket.seeds[0])
        future = asyncio.wrap_future(ticket.future)
        watch = asyncio.ensure_future(request.receive())  # completes when the client goes away
        try:
            await asyncio.wait({future, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not future.done():
                message = watch.result()
                if message.get("type") == "http.disconnect":
                    ticket.cancel("disconnect")
                    request.scope["state"]["log"]["cancelled"] = "disconnect"
                    return Response(status_code=499)
                await future
        finally:
            watch.cancel()
        try:
            results = future.result()
        except EngineError as e:
            if not isinstance(e, (DeadlineExceededError, RequestCancelledError)):
                _log("generation_failed", logging.ERROR, request_id=rid, error=str(e))
            raise result_error(e) from None
        encoded = await run_in_threadpool(lambda: [encode_image(r.image, args["format"], args["quality"])
                                                   for r in results])
        data = [image_item(b, ticket.prompt, r) for r, b in zip(results, encoded, strict=True)]
        return generation_body(data, args["format"], args["size"], rid)

    @app.post("/v1/route")
    async def route(request: Request):
        _check_ready()
        prompts = parse_route(await read_json(request, config.max_body_bytes), config)
        try:
            res = await run_in_threadpool(rt.route_scores, prompts)
        except PromptError as e:
            raise ApiError(400, str(e), param="prompt") from None
        return route_body(manifest, prompts, res)

    @app.get("/v1/models")
    async def models():
        return models_body(manifest)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not batcher.accepting:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
        if not batcher.ready:
            return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "1"})
        return {"status": "ready", **{k: {str(e): v for e, v in d.items()} for k, d in batcher.stats().items()
                                      if k in ("queued", "active")}}

    @app.get("/metrics")
    async def prometheus():
        metrics.refresh(batcher)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestContext, api_key=config.api_key, metrics=metrics)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the Batcher (503s meanwhile) before exiting;
    a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher, drain_timeout_s: float):
        super().__init__(config)
        self.batcher = batcher
        self.drain_timeout_s = drain_timeout_s
        self._draining = False

    def handle_exit(self, sig, frame):
        if self._draining or sig not in (signal.SIGTERM, signal.SIGINT):
            self.force_exit = self.should_exit  # second signal while shutting down: stop waiting
            self.should_exit = True
            return
        self._draining = True
        threading.Thread(target=self._drain, name="aptp-drain", daemon=True).start()

    def _drain(self):
        t = time.monotonic()
        stats = self.batcher.stats()
        _log("draining", timeout_s=self.drain_timeout_s, queued=sum(stats["queued"].values()),
             active=sum(stats["active"].values()))
        # leave part of the budget (up to 3 s) for the last responses, closing connections and the
        # interpreter's exit (measured ~1.5 s on 2 busy cores), so the process is gone within the timeout
        clean = self.batcher.drain(self.drain_timeout_s - min(3.0, self.drain_timeout_s / 4))
        _log("drained", clean=clean, seconds=round(time.monotonic() - t, 3))
        self.should_exit = True


def serve(config: ServeConfig) -> int:
    """Load and verify the export, then serve until SIGTERM/SIGINT (see the module doc). Returns 0."""
    configure_logging()
    rt = Runtime.load(config.engines, provider=config.provider, threads=config.threads)
    batcher = Batcher(rt, config, ServerMetrics())
    app = create_app(batcher, config)
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                        lifespan="on", timeout_graceful_shutdown=1, timeout_keep_alive=5)
    server = DrainingServer(uv, batcher, config.drain_timeout_s)
    _log("starting", host=config.host, port=config.port, engines=config.engines, settings=config.to_dict())
    server.run()
    _log("stopped")
    return 0
