"""`ServeConfig`: every setting of `aptp serve` and of the scheduling core, validated in one place.

Each field is also read from an environment variable `APTP_SERVE_<FIELD>` (upper case), so a
container sets `APTP_SERVE_MAX_QUEUE_IMAGES=64`; command-line flags win over the environment.
Defaults and the measurements behind them are in docs/serving.md.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, fields

from ..backends import PROVIDERS
from ..errors import EngineError
from ..validation import Checks

POLICIES = ("request", "step")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ENV_PREFIX = "APTP_SERVE_"


@dataclass
class ServeConfig:
    """Settings of the server and of `engines.batching.Batcher` (units in the field names)."""

    engines: str = ""  # export directory
    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "auto"  # "auto": what the export records (openvino for an `aptp quantize` export, else cpu)
    workers: int = 2  # worker threads running UNet calls (each owns one batch at a time)
    threads: int = 1  # onnxruntime intra-op threads per session (0 = one per core)
    batching: str = "step"  # "request" | "step"
    max_batch: int = 8  # most images in one UNet call (the UNet batch is twice that with CFG)
    max_wait_ms: float = 10.0  # request policy: longest wait for a batch to fill
    max_queue_images: int = 32  # images waiting to start, all experts together; more -> 503
    max_queue_images_per_expert: int = 0  # the same per expert (0 = max_queue_images)
    timeout_s: float = 120.0  # per-request deadline (queue + generation) -> 504
    drain_timeout_s: float = 30.0  # SIGTERM: longest wait for in-flight requests
    max_n: int = 8  # most images per request
    max_steps: int = 100  # most denoising steps per request
    max_prompt_chars: int = 4000
    max_body_bytes: int = 65536
    default_steps: int = 0  # 0: the export's recommended steps (manifest `sampling`; 25 when it records none)
    default_guidance_scale: float = -1.0  # < 0: the export's recommended guidance scale (7.5 when it records none)
    api_key: str = ""  # non-empty: every request but /healthz and /readyz needs "Authorization: Bearer KEY"
    allowed_hosts: str = ""  # Host names accepted, comma-separated ("*": any); "" = loopback names when bound
    #                          to a loopback address (DNS rebinding), any otherwise
    max_route_prompts: int = 64  # /v1/route: prompts being routed at once, all requests together; more -> 503
    header_timeout_s: float = 10.0  # a connection that has not sent complete request headers by then is closed
    body_timeout_s: float = 30.0  # a request body not received by then -> 408
    max_connections: int = 512  # open connections + requests in progress (uvicorn's limit_concurrency)
    malloc_arenas: int = 2  # glibc malloc arenas for the worker threads (0 = glibc's default; see memory.py)
    trim_interval_s: float = 30.0  # return free heap pages to the system this often (0 = never)
    shrink_arena: int = 1  # 1: onnxruntime gives its CPU arena's unused chunks back after each run; 0: keeps
    #                        the peak of the largest batch per session (faster by ~0-10 %, memory grows in steps)

    def __post_init__(self):
        c = Checks(EngineError, "serve setting ")
        c.string(self.engines, "engines", empty=True)
        c.string(self.host, "host")
        c.integer(self.port, "port", 0, 65535)
        c.string(self.provider, "provider", ("auto", *PROVIDERS))
        c.integer(self.workers, "workers", lo=1)
        c.integer(self.threads, "threads", lo=0)
        c.string(self.batching, "batching", POLICIES)
        for name in ("max_batch", "max_queue_images", "max_n", "max_steps", "max_prompt_chars",
                     "max_body_bytes"):
            c.integer(getattr(self, name), name, lo=1)
        c.integer(self.default_steps, "default_steps", lo=0)
        c.integer(self.max_queue_images_per_expert, "max_queue_images_per_expert", lo=0)
        for name, above in (("max_wait_ms", False), ("timeout_s", True), ("drain_timeout_s", False),
                            ):
            setattr(self, name, c.number(getattr(self, name), name, lo=0, above=above))
        self.default_guidance_scale = c.number(self.default_guidance_scale, "default_guidance_scale", hi=100)
        c.string(self.api_key, "api_key", empty=True)
        c.string(self.allowed_hosts, "allowed_hosts", empty=True)
        c.integer(self.max_route_prompts, "max_route_prompts", lo=1)
        c.integer(self.max_connections, "max_connections", lo=1)
        c.integer(self.malloc_arenas, "malloc_arenas", lo=0)
        c.integer(self.shrink_arena, "shrink_arena", 0, 1)
        self.trim_interval_s = c.number(self.trim_interval_s, "trim_interval_s", lo=0)
        for name in ("header_timeout_s", "body_timeout_s"):
            setattr(self, name, c.number(getattr(self, name), name, lo=0, above=True))
        c.require(self.default_steps <= self.max_steps, "default_steps", f"more than max_steps={self.max_steps}",
                  self.default_steps)

    def for_export(self, manifest) -> ServeConfig:
        """This config with the export's recommended steps / guidance where it says "the export's" (0 / < 0)."""
        d = manifest.sampling_defaults
        steps = self.default_steps or min(d.steps, self.max_steps)
        guidance = d.guidance_scale if self.default_guidance_scale < 0 else self.default_guidance_scale
        return dataclasses.replace(self, default_steps=steps, default_guidance_scale=guidance)

    @property
    def loopback(self) -> bool:
        """Bound to a loopback address only (reachable from this machine alone)."""
        return self.host in LOOPBACK_NAMES or self.host.startswith("127.")

    def host_allow_list(self) -> tuple[str, ...] | None:
        """The Host header names a request may carry, None for any (see `allowed_hosts`)."""
        names = tuple(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())
        if "*" in names:
            return None
        if names:
            return names
        return (*LOOPBACK_NAMES, self.host.lower()) if self.loopback else None

    @property
    def expert_queue_limit(self) -> int:
        """Most waiting images per expert."""
        return self.max_queue_images_per_expert or self.max_queue_images

    def to_dict(self) -> dict:
        """The settings as JSON-ready values, the API key redacted."""
        d = asdict(self)
        d["api_key"] = "***" if self.api_key else ""
        return d

    @classmethod
    def from_env(cls, environ=None, **overrides) -> ServeConfig:
        """Defaults, then `APTP_SERVE_*` variables, then `overrides` (None values are skipped)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            values[f.name] = Checks(EngineError).coerce(raw, ENV_PREFIX + f.name.upper(), type(f.default))
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise EngineError(f"unknown serve setting(s): {', '.join(unknown)}")
        return cls(**values)


def runtime_provider(provider: str) -> str | None:
    """ServeConfig.provider as Runtime.load takes it ("auto" -> None: what the export records)."""
    return None if provider == "auto" else provider
