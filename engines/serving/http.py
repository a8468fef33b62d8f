"""`aptp serve`: the HTTP process over one `Batcher` (engines.serving.batching) in this process.

`LocalService` puts the batcher behind the routes (engines.serving.routes, which documents the endpoints);
`create_app` builds the app; `serve` runs it under uvicorn. SIGTERM: readiness and new requests answer
503, admitted work finishes for up to drain_timeout_s, then the process exits. FastAPI, uvicorn and
prometheus-client are the `serving` extra.
"""

from __future__ import annotations

from ..install import install_hint
import asyncio
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager

from ..errors import BackendError, DeadlineExceededError, EngineError, RequestCancelledError
from ..runtime import Runtime
from .batching import Batcher
from .config import ServeConfig, runtime_provider
from .memory import apply_settings as apply_memory_settings
from .metrics import ServerMetrics
from .protocol import ApiError, encode_image, image_item, result_error, submit_error
from .routes import RouteBudget, build_app, configure_logging, log_event

try:  # the serving extra
    import uvicorn
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.concurrency import run_in_threadpool
except ImportError as _e:  # pragma: no cover - exercised by the torch-free test's environment
    raise BackendError(f'`aptp serve` needs fastapi, uvicorn and prometheus-client ({_e}): '
                       + install_hint("serve")) from None


class LocalService:
    """The routes' `Service` over a Batcher in this process."""

    def __init__(self, batcher: Batcher):
        if not isinstance(batcher.observer, ServerMetrics):
            batcher.observer = ServerMetrics()
        self.batcher = batcher
        self.metrics = batcher.observer
        self.runtime = batcher.runtime
        self.manifest = batcher.runtime.manifest
        self.warm_up_error: str | None = None
        self.routing = RouteBudget(batcher.config.max_route_prompts, self.metrics)

    @property
    def image_size(self):
        return self.batcher.image_size

    async def ready(self) -> None:
        if not self.batcher.accepting:
            self.metrics.rejected("draining")
            raise ApiError(503, "the server is shutting down", code="draining", retry_after=1)
        if not self.batcher.ready:
            self.metrics.rejected("not_ready")
            raise ApiError(503, "the server is warming up", code="not_ready", retry_after=1)

    async def submit(self, args: dict, request_id: str, log_fields: dict) -> list[dict]:
        submitted = asyncio.ensure_future(run_in_threadpool(self.batcher.submit, **args["submit"],
                                                            request_id=request_id))
        try:
            ticket = await asyncio.shield(submitted)
        except asyncio.CancelledError:  # gone before admission finished: cancel the ticket once it exists
            submitted.add_done_callback(lambda f: f.exception() is None and f.result().cancel("disconnect"))
            raise
        except EngineError as e:
            raise submit_error(e) from None
        log_fields.update(expert=str(ticket.expert), images=ticket.n, seed=ticket.seeds[0])
        try:
            results = await asyncio.wrap_future(ticket.future)
        except asyncio.CancelledError:
            ticket.cancel("disconnect")
            raise
        except EngineError as e:
            if not isinstance(e, (DeadlineExceededError, RequestCancelledError)):
                log_event("generation_failed", logging.ERROR, request_id=request_id, error=str(e))
            raise result_error(e, request_id) from None
        encoded = await run_in_threadpool(lambda: [encode_image(r.image, args["format"], args["quality"])
                                                   for r in results])
        return [image_item(b, ticket.prompt, r) for r, b in zip(results, encoded, strict=True)]

    async def route(self, prompts: list[str]):
        await self.ready()
        with self.routing.admit(len(prompts)):
            return await self.routing.run(prompts, lambda part: run_in_threadpool(self.runtime.route_scores, part))

    def health(self) -> tuple[int, dict]:
        problem = self.warm_up_error or self.batcher.alive()
        return (503, {"status": "unhealthy", "reason": problem}) if problem else (200, {"status": "alive"})

    async def readiness(self) -> tuple[int, dict]:
        if not self.batcher.accepting:
            return 503, {"status": "draining"}
        if not self.batcher.ready:
            return 503, {"status": "warming up"}
        return 200, {"status": "ready", **{k: {str(e): v for e, v in d.items()}
                                           for k, d in self.batcher.stats().items() if k in ("queued", "active")}}

    def metrics_text(self) -> tuple[bytes, str]:
        self.metrics.refresh(self.batcher)
        return generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST


def create_app(batcher: Batcher, config: ServeConfig, warm_up: bool = True):
    """The FastAPI app over a Batcher (started, and warmed up in a thread, by the app's lifespan).
    The Batcher's observer becomes the app's ServerMetrics unless it already is one."""
    config = config.for_export(batcher.runtime.manifest)  # requests naming no steps / guidance get the export's
    service = LocalService(batcher)

    def _warm():
        t = time.perf_counter()
        try:
            batcher.warm_up()
        except Exception as e:
            service.warm_up_error = f"warm-up failed: {type(e).__name__}"  # /healthz answers 503 from now on
            log_event("warm_up_failed", logging.ERROR, error=str(e))
            return
        log_event("ready", seconds=round(time.perf_counter() - t, 3), experts=len(batcher.experts),
             image_size=list(batcher.image_size), settings=config.to_dict())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        if warm_up:
            threading.Thread(target=_warm, name="aptp-warm-up", daemon=True).start()
        yield
        await run_in_threadpool(batcher.close, 0.0)

    app = build_app(service, config, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.metrics = service.metrics
    return app


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete `seconds` after it
    opened or after its previous response (stalled or slow-loris clients cannot hold sockets forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._started_cycle = None
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def handle_events(self):
            super().handle_events()
            if self.cycle is not self._started_cycle and self._header_timer is not None:
                self._header_timer.cancel()  # a new request's headers arrived
                self._header_timer = None

        def on_response_complete(self):
            super().on_response_complete()
            self._started_cycle = self.cycle
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _headers_too_slow(self):
            self._header_timer = None
            if self.cycle is self._started_cycle:
                self.transport.close()

        def connection_lost(self, exc):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


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
        log_event("draining", timeout_s=self.drain_timeout_s, queued=sum(stats["queued"].values()),
             active=sum(stats["active"].values()))
        # leave part of the budget (up to 3 s) for the last responses, closing connections and the
        # interpreter's exit (measured ~1.5 s on 2 busy cores), so the process is gone within the timeout
        clean = self.batcher.drain(self.drain_timeout_s - min(3.0, self.drain_timeout_s / 4))
        if not clean:  # what the drain cut off is answered now (503 + Retry-After), before connections close
            self.batcher.close(0.0)
        log_event("drained", clean=clean, seconds=round(time.monotonic() - t, 3))
        self.should_exit = True


def serve(config: ServeConfig) -> int:
    """Load and verify the export, then serve until SIGTERM/SIGINT (see the module doc). Returns 0."""
    configure_logging()
    trimmer = apply_memory_settings(config)  # before any worker or onnxruntime thread exists
    rt = Runtime.load(config.engines, provider=runtime_provider(config.provider), threads=config.threads)
    config = config.for_export(rt.manifest)  # default steps / guidance: the export's where not set
    batcher = Batcher(rt, config, ServerMetrics())
    app = create_app(batcher, config)
    if not config.loopback and not config.api_key:
        log_event("warning", logging.WARNING, message=f"bound to {config.host} (beyond loopback) without --api-key: "
                  "anyone who can reach the port can generate images")
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                        lifespan="on", timeout_graceful_shutdown=1, timeout_keep_alive=5,
                        limit_concurrency=config.max_connections, http=header_timeout_protocol(config.header_timeout_s))
    server = DrainingServer(uv, batcher, config.drain_timeout_s)
    log_event("starting", host=config.host, port=config.port, export=config.engines, settings=config.to_dict())
    trimmer.on_round = app.state.metrics.heap_trimmed
    trimmer.start()
    server.run()
    trimmer.stop()
    log_event("stopped")
    return 0
