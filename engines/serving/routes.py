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

import asyncio
import hmac
import json
import logging
import re
import sys
import time
import uuid
from typing import Protocol

from ..errors import BackendError, PromptError
from .config import ServeConfig
from .protocol import ApiError, generation_body, models_body, parse_generation, parse_route, route_body

try:  # the serving extra
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.datastructures import MutableHeaders
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _e:  # pragma: no cover - exercised by the torch-free test's environment
    raise BackendError(f'`aptp serve` needs fastapi, uvicorn and prometheus-client ({_e}): '
                       'pip install "aptp[serve]"') from None

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

    def metrics_text(self) -> tuple[bytes, str]:
        """(Prometheus exposition, content type) of GET /metrics."""


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


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

    def __init__(self, app, api_key: str, metrics):
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
                await error_response(err)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.request_seconds.labels(endpoint).observe(seconds)
            log_event("request", request_id=rid, method=scope["method"], path=path, status=status[0],
                 seconds=round(seconds, 4), client=(scope.get("client") or ("", 0))[0], **state["log"])

    def _authorised(self, value: str) -> bool:
        scheme, _, token = value.partition(" ")
        # compare_digest on bytes of possibly different lengths is still constant-time in the key
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped answers for ApiError and for Starlette's own 404/405."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error_response(ApiError(exc.status_code, str(exc.detail)))


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
        args = parse_generation(await read_json(request, config.max_body_bytes), config, service.image_size)
        state = request.scope["state"]
        job = asyncio.ensure_future(service.submit(args, state["request_id"], state["log"]))
        watch = asyncio.ensure_future(request.receive())  # completes when the client goes away
        try:
            await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not job.done():
                message = watch.result()
                if message.get("type") == "http.disconnect":
                    job.cancel()
                    state["log"]["cancelled"] = "disconnect"
                    return Response(status_code=499)
                await asyncio.wait({job})
        finally:
            watch.cancel()
        data = job.result()  # ApiError propagates to the handler
        return generation_body(data, args["format"], args["size"], state["request_id"])

    @app.post("/v1/route")
    async def route(request: Request):
        prompts = parse_route(await read_json(request, config.max_body_bytes), config)
        try:
            res = await service.route(prompts)
        except PromptError as e:
            raise ApiError(400, str(e), param="prompt") from None
        return route_body(service.manifest, prompts, res)

    @app.get("/v1/models")
    async def models():
        return models_body(service.manifest)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        status, body = await service.readiness()
        return JSONResponse(body, status_code=status, headers={"Retry-After": "1"} if status != 200 else None)

    @app.get("/metrics")
    async def prometheus():
        text, content_type = service.metrics_text()
        return Response(text, media_type=content_type)

    app.add_middleware(RequestContext, api_key=config.api_key, metrics=service.metrics)
    return app
