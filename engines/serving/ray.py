"""`aptp serve` on Ray Serve: the same HTTP API, with one Ray Serve deployment per expert so each expert
scales with its own traffic (docs/serving.md, "Scale out on Ray Serve").

    ingress (deployment "aptp-ingress")        expert-0, expert-1, ..., dense (one deployment each)
    verifies the export, parses and checks  -> a replica = a Batcher (engines/batching.py) over ONE
    the request (engines/server.py), routes,   expert: per-expert queue, step/request batching,
    encodes the prompt, answers in OpenAI's    deadlines, cancellation; it decodes and encodes the
    shape; 503 + Retry-After when Ray's        images (PNG/JPEG/WebP) and hands them back.
    queue of that expert is full.

Each expert deployment has its own replicas (`autoscaling_config`: min/max replicas, target ongoing
requests), `max_ongoing_requests` per replica (requests its Batcher holds at once), and
`max_queued_requests` (requests waiting in Ray's queue for a replica; one more is refused with Ray's
BackPressureError, answered 503 + Retry-After), and optionally a fraction of a GPU per replica. The
ingress sends the text context with each request, so expert replicas never load the router or the
text encoder, and an expert replica verifies only its own files (the ingress verifies them all).

Started by `aptp serve --ray` (`serve_on_ray`), or by Ray's own CLI:
    serve run engines.ray_serve:app_builder engines=export/NAME max_replicas=2
    serve deploy config.yaml        # import_path: engines.ray_serve:app_builder, args: {...}
Ray is imported here only; without it this module raises BackendError naming the `ray` extra.
"""

from __future__ import annotations

from ..install import install_hint
import asyncio
import math
import os
import signal
import threading
from dataclasses import asdict, dataclass, field, fields

from ..errors import BackendError, EngineError
from ..runtime import Runtime
from ..tokenization import clean_prompts
from ..validation import Checks
from .batching import WARM_UP_PROMPT, Batcher
from .config import ServeConfig, runtime_provider
from .memory import apply_settings as apply_memory_settings
from .metrics import ReplicaMetrics, ServerMetrics
from .protocol import ApiError, encode_image, image_item, model_id, result_error, submit_error
from .routes import RouteBudget
from .routes import build_app as build_routes
from .routes import configure_logging

try:  # the one place Ray is imported
    import ray
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from ray import serve
    from ray.serve.exceptions import BackPressureError
except ImportError as _e:  # pragma: no cover - depends on the install
    raise BackendError(f'`aptp serve --ray` needs Ray Serve ({_e}): {install_hint("ray")}') from None

APP_NAME = "aptp"
INGRESS = "aptp-ingress"


@dataclass
class RayOptions:
    """Ray Serve settings of the expert deployments (and of the ingress). `experts` overrides any of
    the per-expert fields for one expert: {"1": {"max_replicas": 4}, "dense": {"num_gpus": 1}}."""

    min_replicas: int = 1  # replicas per expert deployment, at least
    max_replicas: int = 1  # ... at most (above min_replicas: Ray autoscales on ongoing requests)
    target_ongoing_requests: float = 0.0  # autoscaling target per replica (0 = max_ongoing_requests / 2)
    max_ongoing_requests: int = 0  # requests a replica's Batcher holds at once (0 = workers * max_batch)
    max_queued_requests: int = 0  # requests waiting in Ray's queue of an expert; more -> 503 (0 = max_queue_images)
    num_cpus: float = 1.0  # CPUs reserved per expert replica
    num_gpus: float = 0.0  # GPUs (a fraction shares one) per expert replica
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.0
    experts: dict = field(default_factory=dict)

    PER_EXPERT = ("min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
                  "max_queued_requests", "num_cpus", "num_gpus")

    def __post_init__(self):
        for f in fields(self):
            if f.name != "experts":
                setattr(self, f.name, _RAY.coerce(getattr(self, f.name), f.name, type(f.default)))
        if not isinstance(self.experts, dict):
            raise EngineError(f"ray setting experts={self.experts!r}: expected a mapping expert id -> settings")
        experts = {}
        for k, d in self.experts.items():
            bad = [name for name in (d or {}) if name not in self.PER_EXPERT]
            if bad:
                raise EngineError(f"ray setting experts[{k!r}]: unknown {bad[0]!r} (choose from "
                                  f"{', '.join(self.PER_EXPERT)})")
            experts[str(k)] = {name: _RAY.coerce(v, name, type(getattr(self, name))) for name, v in (d or {}).items()}
        self.experts = experts
        self.for_expert("*")  # validates the defaults

    def for_expert(self, expert) -> dict:
        """The per-expert settings of `expert` (defaults, then its overrides), checked."""
        d = {name: getattr(self, name) for name in self.PER_EXPERT}
        d.update(self.experts.get(str(expert), {}))
        if d["min_replicas"] < 0 or d["max_replicas"] < max(1, d["min_replicas"]):
            raise EngineError(f"ray settings of {expert}: need 0 <= min_replicas <= max_replicas, max_replicas >= 1 "
                              f"(got {d['min_replicas']}, {d['max_replicas']})")
        for name in ("num_cpus", "num_gpus", "target_ongoing_requests", "max_ongoing_requests", "max_queued_requests"):
            if d[name] < 0:
                raise EngineError(f"ray setting {name} of {expert}: expected >= 0, got {d[name]}")
        return d


_RAY = Checks(EngineError, "ray setting ")


# -- the expert deployment -------------------------------------------------------------------------
class ExpertReplica:
    """One replica of one expert's deployment: a Batcher over that expert alone."""

    def __init__(self, engines: str, expert, settings: dict):
        self.config = ServeConfig(**settings)  # made for_export below, once the manifest is read
        self._trimmer = apply_memory_settings(self.config)  # this replica's process (engines/serving/memory.py)
        # the ingress verified every file; this replica re-hashes the files it opens (its expert, the VAE)
        rt = Runtime.load(engines, provider=runtime_provider(self.config.provider), threads=self.config.threads, verify=False)
        self.config = self.config.for_export(rt.manifest)
        self.expert = expert
        self.metrics = ServerMetrics()  # scraped by the ingress (stats), shown there as aptp_replica_*
        self.batcher = Batcher(rt, self.config, self.metrics, experts=[expert]).start()
        self._trimmer.on_round = self.metrics.heap_trimmed
        self._trimmer.start()
        try:
            rid = serve.get_replica_context().replica_id
            self.replica_id = str(getattr(rid, "unique_id", rid))
        except Exception:  # outside a Serve replica (tests call the class directly)
            self.replica_id = f"pid{os.getpid()}"
        self._warm = threading.Lock()

    def _warm_up(self, uncond) -> None:
        with self._warm:
            if not self.batcher.ready:
                self.batcher.warm_up(context=uncond)

    async def warm_up(self, uncond) -> dict:
        """Run the expert's UNet and the VAE once (with the ingress's unconditional context)."""
        if not self.batcher.ready:
            await asyncio.to_thread(self._warm_up, uncond)
        return {"image_size": list(self.batcher.image_size), **self.batcher.stats()}

    async def generate(self, req: dict) -> dict:
        """req: submit (Batcher.submit's arguments), context, uncond, request_id, format, quality.
        Returns {"data": [...]} or {"error": ApiError fields} (errors cross Ray as values)."""
        if not self.batcher.ready:
            await asyncio.to_thread(self._warm_up, req["uncond"])
        try:
            ticket = await asyncio.to_thread(self.batcher.submit, **req["submit"], context=req["context"],
                                             uncond=req["uncond"], request_id=req["request_id"])
        except EngineError as e:
            return {"error": vars(submit_error(e))}
        try:
            results = await asyncio.wrap_future(ticket.future)
        except asyncio.CancelledError:  # the client went away: Ray cancels this call
            ticket.cancel("disconnect")
            raise
        except EngineError as e:
            return {"error": vars(result_error(e))}
        fmt, quality = req["format"], req["quality"]
        encoded = await asyncio.to_thread(lambda: [encode_image(r.image, fmt, quality) for r in results])
        return {"data": [{"b64_json": b, "expert": r.expert, "seed": r.seed, "queued_s": r.queued_s,
                          "seconds": r.seconds, "unet_calls": r.unet_calls} for r, b in zip(results, encoded, strict=True)]}

    async def stats(self) -> dict:
        """This replica's Prometheus exposition (its Batcher's queues, UNet calls, images; its process)."""
        self.metrics.refresh(self.batcher)
        return {"replica": self.replica_id, "text": generate_latest(self.metrics.registry).decode()}

    def __del__(self):
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close(0.0)
        if getattr(self, "_trimmer", None) is not None:
            self._trimmer.stop()


# -- the ingress -----------------------------------------------------------------------------------
class Ingress:
    """Verifies the export, routes and encodes prompts, and answers HTTP like `aptp serve`: the routes'
    `Service` (engines.serving.routes) over one Ray Serve deployment per expert."""

    def __init__(self, engines: str, settings: dict, experts: dict):
        configure_logging()
        self.config = cfg = ServeConfig(**settings)
        self.rt = rt = Runtime.load(engines, provider=runtime_provider(cfg.provider), threads=cfg.threads)  # hashes every file
        self.config = cfg = cfg.for_export(rt.manifest)
        self.manifest = rt.manifest
        self.handles = dict(experts)  # model id ("aptp:expert-0", "aptp:dense") -> DeploymentHandle
        rt.route([WARM_UP_PROMPT])
        rt.condition([WARM_UP_PROMPT])
        self.uncond = rt.uncond()
        self.metrics = ServerMetrics()
        self.replicas = ReplicaMetrics()
        self.metrics.registry.register(self.replicas)
        self.image_size: tuple[int, int] | None = None
        self.warm: set = set()
        self.routing = RouteBudget(cfg.max_route_prompts, self.metrics)
        self.images_in_flight = 0  # admitted through this ingress replica, bounded by max_queue_images

    async def _warm_experts(self) -> None:
        """Ask every expert deployment to warm up (one replica each; later replicas warm on first use)."""
        cold = [m for m in self.handles if m not in self.warm]
        if not cold:
            return
        answers = await asyncio.gather(*(self.handles[m].warm_up.remote(self.uncond) for m in cold))
        for m, a in zip(cold, answers, strict=True):
            self.warm.add(m)
            self.image_size = tuple(a["image_size"])

    async def ready(self) -> None:
        try:
            await self._warm_experts()
        except Exception as e:
            self.metrics.rejected("not_ready")
            raise ApiError(503, f"the expert deployments are not ready ({str(e)[:200]})", code="not_ready",
                           retry_after=1) from None

    async def submit(self, args: dict, request_id: str, log_fields: dict) -> list[dict]:
        sub = dict(args["submit"])
        n = sub["n"]
        if self.images_in_flight + n > self.config.max_queue_images:  # cheap refusal, before any routing work
            self.metrics.rejected("queue_full")
            raise ApiError(503, f"{self.images_in_flight} images in flight through the ingress (limit "
                                f"{self.config.max_queue_images}); retry later", code="queue_full", retry_after=1)
        self.images_in_flight += n
        try:
            return await self._submit(sub, args, request_id, log_fields)
        finally:
            self.images_in_flight -= n

    async def _submit(self, sub: dict, args: dict, request_id: str, log_fields: dict) -> list[dict]:
        try:
            prompt = clean_prompts([sub["prompt"]])[0]
            expert = sub["expert"]
            if expert is None:
                expert = (await asyncio.to_thread(self.rt.route, [prompt]))[0]
                self.metrics.routed(1)
            elif model_id(expert) not in self.handles:
                raise EngineError(f"model: {model_id(expert)!r} is not served here (see GET /v1/models)")
            context = await asyncio.to_thread(self.rt.condition, [prompt], 64, clean=False)
        except EngineError as e:
            raise submit_error(e) from None
        sub["expert"] = expert
        log_fields.update(expert=str(expert), images=sub["n"], seed=sub["params"].seed)
        req = {"submit": sub, "context": context, "uncond": self.uncond, "request_id": request_id,
               "format": args["format"], "quality": args["quality"]}
        try:
            out = await self.handles[model_id(expert)].generate.remote(req)
        except BackPressureError as e:
            self.metrics.rejected("expert_queue_full")
            waiting, limit = (list(e.args) + [None, None])[:2]
            retry = getattr(e, "retry_after_s", None) or 1
            raise ApiError(503, f"the queue of {model_id(expert)} is full ({waiting} requests waiting, limit {limit}); "
                                "retry later", code="expert_queue_full", retry_after=max(1, math.ceil(retry))) from None
        if "error" in out:
            raise ApiError(**out["error"])
        return [image_item(d["b64_json"], prompt, d) for d in out["data"]]

    async def route(self, prompts: list[str]):
        with self.routing.admit(len(prompts)):
            return await self.routing.run(prompts, lambda part: asyncio.to_thread(self.rt.route_scores, part))

    def health(self) -> tuple[int, dict]:
        return 200, {"status": "alive"}

    async def readiness(self) -> tuple[int, dict]:
        try:
            await self._warm_experts()
        except Exception as e:
            return 503, {"status": f"experts warming up ({str(e)[:200]})"}
        return 200, {"status": "ready", "deployments": sorted(self.handles)}

    async def metrics_text(self) -> tuple[bytes, str]:
        """The ingress's metrics and, as aptp_replica_*, each expert deployment's (one replica per deployment
        answers each scrape; with several replicas the others' last answers stay for ReplicaMetrics.stale_s)."""
        async def scrape(model, handle):
            try:
                return model, await asyncio.wait_for(asyncio.ensure_future(handle.stats.remote()), 2.0)
            except Exception:  # busy (Ray queue full), timed out, or the replica died
                return model, None

        for model, answer in await asyncio.gather(*(scrape(m, h) for m, h in self.handles.items())):
            self.replicas.update(model, answer)
        return generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST

    def __serve_build_asgi_app__(self):
        return build_routes(self, self.config, title="aptp serve --ray")


# -- building the application ----------------------------------------------------------------------
def expert_deployment_options(config: ServeConfig, options: RayOptions, expert) -> dict:
    """Ray Serve options of one expert's deployment (name, replicas or autoscaling, queue bounds, resources)."""
    d = options.for_expert(expert)
    max_ongoing = d["max_ongoing_requests"] or config.workers * config.max_batch
    opts = {
        "name": model_id(expert).split(":", 1)[1],  # expert-0, ..., dense
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": d["max_queued_requests"] or config.expert_queue_limit,
        "graceful_shutdown_timeout_s": config.drain_timeout_s,
        "ray_actor_options": {"num_cpus": d["num_cpus"], "num_gpus": d["num_gpus"]},
    }
    if d["max_replicas"] > d["min_replicas"]:
        opts["autoscaling_config"] = {"min_replicas": d["min_replicas"], "max_replicas": d["max_replicas"],
                                      "target_ongoing_requests": d["target_ongoing_requests"] or max_ongoing / 2}
    else:
        opts["num_replicas"] = d["max_replicas"]
    return opts


def build_app(config: ServeConfig, options: RayOptions | None = None):
    """The Ray Serve application (an ingress bound to one deployment per expert, and the dense model's)."""
    from ..manifest import read_manifest

    options = options or RayOptions()
    if not config.engines:
        raise EngineError("give the export directory (engines=DIR)")
    manifest = read_manifest(config.engines)
    experts = [e.id for e in manifest.experts] + (["dense"] if manifest.dense is not None else [])
    settings = asdict(config)
    handles = {}
    for e in experts:
        dep = serve.deployment(ExpertReplica).options(**expert_deployment_options(config, options, e))
        handles[model_id(e)] = dep.bind(config.engines, e, settings)
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name=INGRESS, num_replicas=options.ingress_replicas,
        max_ongoing_requests=max(100, 4 * sum(expert_deployment_options(config, options, e)["max_ongoing_requests"]
                                              for e in experts)),
        ray_actor_options={"num_cpus": options.ingress_num_cpus})
    return ingress.bind(config.engines, settings, handles)


def split_args(args: dict) -> tuple[ServeConfig, RayOptions]:
    """`serve run engines.ray_serve:app_builder k=v ...` / a config file's `args`: ServeConfig fields
    (as for `aptp serve`; APTP_SERVE_* variables apply too) and RayOptions fields, in one mapping."""
    args = dict(args or {})
    ray_names = {f.name for f in fields(RayOptions)}
    ray_args = {k: args.pop(k) for k in list(args) if k in ray_names}
    serve_names = {f.name: type(f.default) for f in fields(ServeConfig)}
    unknown = [k for k in args if k not in serve_names]
    if unknown:
        raise EngineError(f"unknown setting {unknown[0]!r}: ServeConfig fields ({', '.join(serve_names)}) or "
                          f"RayOptions fields ({', '.join(sorted(ray_names))})")
    for k, v in args.items():
        if isinstance(v, str) and serve_names[k] is not str:
            try:
                args[k] = serve_names[k](v)
            except ValueError:
                raise EngineError(f"setting {k}={v!r}: expected a {serve_names[k].__name__}") from None
    return ServeConfig.from_env(**args), RayOptions(**ray_args)


def app_builder(args: dict):
    """Entry point for `serve run engines.ray_serve:app_builder engines=DIR [k=v ...]` and config files."""
    config, options = split_args(args)
    return build_app(config, options)


# -- `aptp serve --ray` ----------------------------------------------------------------------------
def serve_on_ray(config: ServeConfig, options: RayOptions | None = None, num_cpus: int | None = None) -> int:
    """Deploy on the Ray cluster at RAY_ADDRESS (else a local one of `num_cpus` CPUs), serve on
    config.host:config.port until SIGTERM/SIGINT, then delete the application (and stop a local Ray)."""
    address = os.environ.get("RAY_ADDRESS")
    app = build_app(config, options)
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"aptp serve --ray: http://{config.host}:{config.port} ({'cluster ' + address if address else 'local Ray'})",
              flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        if address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
            ray.shutdown()
    return 0
