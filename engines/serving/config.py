"""`ServeConfig`: every setting of `aptp serve` and of the scheduling core, validated in one place.

Each field is also read from an environment variable `APTP_SERVE_<FIELD>` (upper case), so a
container sets `APTP_SERVE_MAX_QUEUE_IMAGES=64`; command-line flags win over the environment.
Defaults and the measurements behind them are in docs/serving.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

from ..errors import EngineError
from ..backends import PROVIDERS

POLICIES = ("request", "step")
ENV_PREFIX = "APTP_SERVE_"


@dataclass
class ServeConfig:
    """Settings of the server and of `engines.batching.Batcher` (units in the field names)."""

    engines: str = ""  # export directory
    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "cpu"
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
    default_steps: int = 25
    default_guidance_scale: float = 7.5
    api_key: str = ""  # non-empty: every request but /healthz and /readyz needs "Authorization: Bearer KEY"

    def __post_init__(self):
        def bad(name, why):
            raise EngineError(f"serve setting {name}={getattr(self, name)!r}: {why}")

        def integer(name, lo, hi=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                bad(name, f"expected an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))

        def number(name, lo, strict=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or (strict and v == lo):
                bad(name, f"expected a number {'>' if strict else '>='} {lo}")
            setattr(self, name, float(v))

        if not isinstance(self.engines, str):
            bad("engines", "expected a directory path")
        if not isinstance(self.host, str) or not self.host:
            bad("host", "expected a host name or address")
        integer("port", 0, 65535)
        if self.provider not in PROVIDERS:
            bad("provider", f"choose from {', '.join(PROVIDERS)}")
        integer("workers", 1)
        integer("threads", 0)
        if self.batching not in POLICIES:
            bad("batching", f"choose from {', '.join(POLICIES)}")
        for name in ("max_batch", "max_queue_images", "max_n", "max_steps", "max_prompt_chars",
                     "max_body_bytes", "default_steps"):
            integer(name, 1)
        integer("max_queue_images_per_expert", 0)
        number("max_wait_ms", 0)
        number("timeout_s", 0, strict=True)
        number("drain_timeout_s", 0)
        number("default_guidance_scale", 0)
        if not isinstance(self.api_key, str):
            bad("api_key", "expected a string")
        if self.default_steps > self.max_steps:
            bad("default_steps", f"more than max_steps={self.max_steps}")

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
            kind = type(f.default)
            try:
                values[f.name] = raw if kind is str else kind(raw)
            except ValueError:
                raise EngineError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: expected a{'n' if kind is int else ''} "
                                  f"{kind.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise EngineError(f"unknown serve setting(s): {', '.join(unknown)}")
        return cls(**values)
