"""The HTTP routes of `aptp serve`, written once, in front of any `Service`: the local batcher
(engines.serving.http) and the Ray Serve ingress (engines.serving.ray) implement the same protocol, so a new
endpoint is one handler here.

Endpoints (docs/serving.md has examples):
- POST /v1/images/generations  OpenAI Images API: prompt, n, size ("auto" or the export's), response_format
  (b64_json), output_format (png|jpeg|webp), output_compression, model ("aptp" routes, "aptp:expert-K" /
  "aptp:dense" force one model); extensions seed, steps, guidance_scale, guidance_rescale, scheduler
  (engines.request.GenerationParams). Each data item also carries its expert, model, seed and timings.
  Errors in OpenAI's shape {"error": {message, type, param, code}}: 400 bad input (param names the field),
  401 bad key, 503 + Retry-After (queue full, not ready, draining), 504 (deadline passed). A client that
  disconnects cancels its request (499 in the log).
- POST /v1/route  {"prompt": str | [str]} -> expert, MACs fraction and router scores per prompt.
- GET /v1/models  "aptp" and one model per expert (MACs fraction, share) and "aptp:dense".
- GET /healthz (alive) · GET /readyz (200 once ready; 503 while warming up or draining) · GET /metrics.

Every response carries X-Request-ID (the client's, or a new one); one JSON log line per request.
"""

from __future__ import annotations

from ..install import install_hint
import asyncio
import hmac
import inspect
import json
import logging
import re
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Protocol

import numpy as np

from ..errors import BackendError, PromptError
from ..runtime import RouteResult
from .config import ServeConfig
from .protocol import ApiError, generation_body, models_body, parse_generation, parse_route, route_body

try:  # the serving extra
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.datastructures import MutableHeaders
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _e:  # pragma: no cover - exercised by the torch-free test's environment
    raise BackendError(f'`aptp serve` needs fastapi, uvicorn and prometheus-client ({_e}): '
                       + install_hint("serve")) from None

log = logging.getLogger("aptp.serve")

OPEN_PATHS = ("/healthz", "/readyz")  # answered without the API key (probes)
ENDPOINTS = ("/v1/images/generations", "/v1/route", "/v1/models", "/healthz", "/readyz", "/metrics")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class Service(Protocol):
    """What the routes need from a server behind them (the local batcher or the Ray ingress)."""

    manifest: object  # engines.manifest.Manifest
    metrics: object   # engines.serving.metrics.ServerMetrics (its `requests` / `request_seconds` are used here)
    image_size: tuple[int, int] | None

    async def ready(self) -> None:
        """Return when requests can be served; raise ApiError 503 (with Retry-After) otherwise."""

    async def submit(self, args: dict, request_id: str, log_fields: dict) -> list[dict]:
        """Generate the images of a parsed request (`parse_generation`'s dict); returns the response's data
        items (`protocol.image_item`). Raises ApiError. Cancelling the call cancels the request."""

    async def route(self, prompts: list[str]):
        """Router scores of cleaned prompts (engines.runtime.RouteResult)."""

    async def readiness(self) -> tuple[int, dict]:
        """(status code, body) of GET /readyz."""

    def health(self) -> tuple[int, dict]:
        """(status code, body) of GET /healthz: 503 when the service cannot recover (warm-up failed, a
        worker died), so an orchestrator restarts it."""

    def metrics_text(self) -> tuple[bytes, str]:
        """(Prometheus exposition, content type) of GET /metrics (may be a coroutine function)."""


class RouteBudget:
    """Admission for /v1/route: at most `limit` prompts are routed at once (all requests together); a request
    over it is refused at once (503 + Retry-After) instead of queueing work and memory. The work runs in
    chunks of CHUNK prompts, so a client that goes away stops it after the current chunk. Single event loop:
    no lock needed."""

    CHUNK = 8

    def __init__(self, limit: int, metrics):
        self.limit, self.in_flight, self.metrics = int(limit), 0, metrics

    @contextmanager
    def admit(self, n: int):
        if self.in_flight + n > self.limit:
            self.metrics.rejected("route_busy")
            raise ApiError(503, f"routing {self.in_flight} prompts already (limit {self.limit} at once); retry later",
                           code="route_busy", retry_after=1)
        self.in_flight += n
        try:
            yield
        finally:
            self.in_flight -= n

    async def run(self, prompts: list[str], call):
        """`call(chunk)` (awaitable RouteResult) over chunks of the prompts, joined."""
        parts = []
        for i in range(0, len(prompts), self.CHUNK):
            parts.append(await call(prompts[i:i + self.CHUNK]))
            self.metrics.routed(len(parts[-1].expert_ids), "/v1/route")
        return RouteResult([e for p in parts for e in p.expert_ids], np.concatenate([p.scores for p in parts]))


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


MAX_JSON_DEPTH = 16  # the API's bodies are flat; deeper nesting is refused before parsing


async def read_json(request: Request, limit: int, timeout_s: float = 30.0) -> dict:
    """The request's JSON object body: Content-Type application/json (else 415), at most `limit` bytes (else
    413) received within `timeout_s` (else 408), nested at most MAX_JSON_DEPTH deep, valid UTF-8 without lone
    surrogates (else 400 naming `body`)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}", param="body")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body is {length} bytes, more than the {limit} accepted", param="body")
    body = bytearray()

    async def receive_body():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise ApiError(413, f"request body is more than the {limit} bytes accepted", param="body")

    try:
        await asyncio.wait_for(receive_body(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"request body not received within {timeout_s:g} s", param="body") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} deep", param="body")
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "request body is not valid JSON", param="body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", param="body")
    bad = _bad_unicode(data)
    if bad is not None:
        raise ApiError(400, "invalid Unicode (a lone surrogate) in the request", param=bad)
    return data


def json_depth(body: bytes) -> int:
    """Deepest nesting of [ and { in JSON text, strings skipped (no parsing, linear time)."""
    depth = deepest = 0
    in_string = escaped = False
    for b in body:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _bad_unicode(value, where: str = "body") -> str | None:
    """The field holding a string that is not valid Unicode (JSON allows escaped lone surrogates), else None."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        field = k if isinstance(k, str) and where == "body" else where
        for s in ((k,) if isinstance(k, str) else ()) + ((v,) if isinstance(v, str) else ()):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                return field.encode("utf-8", "replace").decode() if isinstance(field, str) else where
        if isinstance(v, (dict, list)):
            bad = _bad_unicode(v, field)
            if bad is not None:
                return bad
    return None


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


def log_event(event: str, level=logging.INFO, **fields) -> None:
    log.log(level, event, extra={"fields": fields})


# -- the middleware: request id, API key, metrics, access log -------------------------------------
class RequestContext:
    """Pure ASGI middleware (no BaseHTTPMiddleware: the handlers must see the client's disconnect)."""

    def __init__(self, app, api_key: str, metrics, allowed_hosts: tuple[str, ...] | None = None):
        self.app = app
        self.api_key = api_key.encode()
        self.metrics = metrics
        self.allowed_hosts = allowed_hosts  # None: any Host header

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
                state["response_started"] = True
                status[0] = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        state["authorised"] = not self.api_key or self._authorised(headers.get("authorization", ""))
        in_flight = getattr(self.metrics, "in_flight", None)
        if in_flight is not None:
            in_flight.labels(endpoint).inc()
        try:
            host = host_name(headers.get("host", ""))
            if self.allowed_hosts is not None and host not in self.allowed_hosts:
                err = ApiError(403, f"Host {host[:80]!r} is not served here (a loopback server answers only "
                                    "its own names; see --allowed-hosts)", code="host_not_allowed")
                await error_response(err)(scope, receive, send_with_id)
            elif not state["authorised"] and path not in OPEN_PATHS:
                err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
                await error_response(err)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as e:  # the last resort: no route may answer with a text/plain 500
            log.error("unhandled", exc_info=True, extra={"fields": {"request_id": rid, "path": path}})
            if state.get("response_started"):
                raise
            state["log"]["error"] = type(e).__name__
            err = ApiError(500, f"internal error (request id {rid}; the server log has the details)",
                           code="internal_error")
            await error_response(err)(scope, receive, send_with_id)
        finally:
            if in_flight is not None:
                in_flight.labels(endpoint).dec()
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.request_seconds.labels(endpoint).observe(seconds)
            log_event("request", request_id=rid, method=scope["method"], path=path, status=status[0],
                 seconds=round(seconds, 4), client=(scope.get("client") or ("", 0))[0], **state["log"])

    def _authorised(self, value: str) -> bool:
        scheme, _, token = value.partition(" ")
        # compare_digest on bytes of possibly different lengths is still constant-time in the key
        # the header's bytes (decoded as latin-1 above) against the key's UTF-8 bytes: non-ASCII keys work too
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self.api_key)


def host_name(value: str) -> str:
    """The host of a Host header: "[::1]:8000" -> "::1", "127.0.0.1:8000" -> "127.0.0.1", lower case."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:v.find("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped answers for ApiError and for Starlette's own 404/405."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error_response(ApiError(exc.status_code, str(exc.detail), allow=(exc.headers or {}).get("Allow")))


# -- the routes ------------------------------------------------------------------------------------
def build_app(service: Service, config: ServeConfig, title: str = "aptp serve", lifespan=None) -> FastAPI:
    """The FastAPI app: every endpoint, in front of `service`."""
    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.config = config
    install_error_handlers(app)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        await service.ready()
        args = parse_generation(await read_json(request, config.max_body_bytes, config.body_timeout_s), config,
                                service.image_size)
        state = request.scope["state"]
        data = await until_disconnect(request, service.submit(args, state["request_id"], state["log"]))
        if data is None:
            return Response(status_code=499)
        return generation_body(data, args["format"], args["size"], state["request_id"])

    @app.post("/v1/route")
    async def route(request: Request):
        prompts = parse_route(await read_json(request, config.max_body_bytes, config.body_timeout_s), config)
        try:
            res = await until_disconnect(request, service.route(prompts))
        except PromptError as e:
            raise ApiError(400, str(e), param="prompt") from None
        if res is None:
            return Response(status_code=499)
        return route_body(service.manifest, prompts, res)

    @app.get("/v1/models")
    async def models():
        return models_body(service.manifest)

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz(request: Request):
        status, body = await service.readiness()
        if not request.scope["state"].get("authorised"):
            body = {"status": body.get("status")}  # queue detail only with the API key
        return JSONResponse(body, status_code=status, headers={"Retry-After": "1"} if status != 200 else None)

    @app.get("/metrics")
    async def prometheus():
        answer = service.metrics_text()
        text, content_type = (await answer) if inspect.isawaitable(answer) else answer
        return Response(text, media_type=content_type)

    app.add_middleware(RequestContext, api_key=config.api_key, metrics=service.metrics,
                       allowed_hosts=config.host_allow_list())
    return app


async def until_disconnect(request: Request, work):
    """Await the coroutine `work`, cancelling it when the client goes away (then None; "cancelled" is logged)."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(request.receive())  # completes when the client goes away
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not job.done():
            message = watch.result()
            if message.get("type") == "http.disconnect":
                job.cancel()
                request.scope["state"]["log"]["cancelled"] = "disconnect"
                return None
            await asyncio.wait({job})
    finally:
        watch.cancel()
    return job.result()  # ApiError propagates to the handler
