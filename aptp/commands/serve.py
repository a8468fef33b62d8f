"""Serve an exported engines directory over HTTP: OpenAI-compatible POST /v1/images/generations,
POST /v1/route, GET /v1/models, /healthz, /readyz and Prometheus /metrics, with per-expert queues,
request- or step-level batching, bounded queues (503 + Retry-After), deadlines (504), client
disconnects cancelling work, and draining on SIGTERM. With --ray: the same API on Ray Serve, one
deployment per expert (autoscaled with --ray-min/max-replicas), on the cluster at RAY_ADDRESS or a local Ray. Every flag can also be set as an environment
variable APTP_SERVE_<FLAG> (e.g. APTP_SERVE_MAX_QUEUE_IMAGES=64); a flag wins over the variable.
Needs the serving extra (pip install -e ".[serve]" from the checkout); runs without torch. See docs/serving.md."""

from __future__ import annotations

from dataclasses import fields

from engines.errors import UserError
from engines.serving.config import POLICIES, ServeConfig
from engines.serving.http import serve  # a clear one-line error names the serving extra when it is missing
from engines.backends import PROVIDERS

_DEFAULTS = ServeConfig()
# flag -> help; the type and the default come from ServeConfig
_HELP = {
    "engines": "export directory (with manifest.json); required here or as APTP_SERVE_ENGINES",
    "host": "address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes the server)",
    "port": "TCP port",
    "provider": "inference backend",
    "workers": "worker threads running UNet calls; up to this many batches run at once (one per worker)",
    "threads": "onnxruntime intra-op threads per session (0 = one per core)",
    "batching": "'request': batch up to --max-batch waiting images of an expert and run them to the end; "
                "'step': images join and leave an expert's running batch at every denoising step",
    "max_batch": "most images in one UNet call (twice as many UNet samples with guidance)",
    "max_wait_ms": "request policy: longest wait for a batch to fill",
    "max_queue_images": "images waiting to start, all experts together; a request that does not fit gets "
                        "503 + Retry-After at once",
    "max_queue_images_per_expert": "the same limit per expert (0 = --max-queue-images)",
    "timeout_s": "per-request deadline in seconds (queue + generation); past it the request gets 504 and "
                 "its work is dropped",
    "drain_timeout_s": "on SIGTERM: seconds to let admitted requests finish before exiting",
    "max_n": "most images per request (field n)",
    "max_steps": "most denoising steps per request (field steps)",
    "max_prompt_chars": "longest prompt accepted, in characters",
    "max_body_bytes": "largest request body accepted, in bytes",
    "default_steps": "denoising steps when a request gives none",
    "default_guidance_scale": "classifier-free guidance scale when a request gives none",
    "api_key": "require 'Authorization: Bearer KEY' on every endpoint but /healthz and /readyz "
               "(prefer the environment variable APTP_SERVE_API_KEY: flags show in ps)",
    "allowed_hosts": "Host header names answered, comma-separated ('*': any); default: when bound to a loopback "
                     "address only localhost, 127.0.0.1, ::1 (a web page cannot reach it by DNS rebinding), else any",
    "max_route_prompts": "/v1/route: prompts routed at once, all requests together; a request that does not fit "
                         "gets 503 + Retry-After at once",
    "header_timeout_s": "close a connection whose request headers are not complete this long after it opened "
                        "(or after its previous response)",
    "body_timeout_s": "a request body not received within this many seconds gets 408",
    "max_connections": "open connections and requests in progress at once; more get 503 from uvicorn",
    "malloc_arenas": "glibc malloc arenas for the worker threads, set at start (0 = glibc's default of 8 per "
                     "core; the MALLOC_ARENA_MAX environment variable wins); fewer arenas keep memory flat",
    "trim_interval_s": "every this many seconds return free heap pages to the system (glibc malloc_trim; "
                       "0 = never)",
    "shrink_arena": "1: onnxruntime returns its CPU arena's unused memory after every run (memory stays flat); "
                    "0: each session keeps the peak of its largest batch (a little faster, memory grows in steps)",
}
_CHOICES = {"provider": ("auto", *PROVIDERS), "batching": POLICIES}


def add_arguments(parser) -> None:
    for f in fields(ServeConfig):
        default = getattr(_DEFAULTS, f.name)
        shown = "unset" if f.name in ("engines", "api_key") else default
        flags = ("--export", "--engines") if f.name == "engines" else (f"--{f.name.replace('_', '-')}",)
        parser.add_argument(*flags, dest=f.name, type=type(default), default=None,
                            choices=_CHOICES.get(f.name), metavar=None if f.name in _CHOICES else ("DIR" if f.name == "engines" else f.name.upper()),
                            help=f"{_HELP[f.name]} (default {shown}; env APTP_SERVE_{f.name.upper()})")
    ray = parser.add_argument_group("Ray Serve (--ray; needs pip install -e \".[ray]\")")
    ray.add_argument("--ray", action="store_true",
                     help="serve on Ray Serve: an ingress plus one deployment per expert, on the cluster at "
                          "RAY_ADDRESS when set, else on a local Ray instance (docs/serving.md)")
    for name, kind, text in _RAY_FLAGS:
        ray.add_argument(f"--ray-{name.replace('_', '-')}", dest=f"ray_{name}", type=kind, default=None,
                         metavar=name.upper(), help=text)


# RayOptions field, type, help (defaults are RayOptions')
_RAY_FLAGS = (
    ("min_replicas", int, "replicas per expert deployment, at least (default 1)"),
    ("max_replicas", int, "replicas per expert deployment, at most; above --ray-min-replicas Ray autoscales "
                          "(default 1)"),
    ("target_ongoing_requests", float, "autoscaling target of ongoing requests per replica "
                                       "(default --ray-max-ongoing-requests / 2)"),
    ("max_ongoing_requests", int, "requests one expert replica holds at once (default workers * max batch)"),
    ("max_queued_requests", int, "requests waiting in Ray's queue of one expert; more get 503 + Retry-After "
                                 "(default --max-queue-images-per-expert, else --max-queue-images)"),
    ("num_cpus", float, "CPUs reserved per expert replica (default 1)"),
    ("num_gpus", float, "GPUs per expert replica; a fraction (0.5) shares one GPU (default 0)"),
)


def run(args) -> int:
    config = ServeConfig.from_env(**{f.name: getattr(args, f.name, None) for f in fields(ServeConfig)})
    if not config.engines:
        raise UserError("give --export DIR (or APTP_SERVE_ENGINES)")
    if getattr(args, "ray", False):
        from engines.serving.ray import RayOptions, serve_on_ray  # names the ray extra when Ray is missing

        options = {name: getattr(args, f"ray_{name}") for name, _, _ in _RAY_FLAGS
                   if getattr(args, f"ray_{name}", None) is not None}
        return serve_on_ray(config, RayOptions(**options))
    return serve(config)
