"""The HTTP API's request and response model, without FastAPI: parsing and checking request bodies (into
engines.request.GenerationParams and output options), OpenAI-shaped errors, and the response bodies. The
routes (engines.serving.routes) and both services (local batcher, Ray ingress) use these, and nothing else
decides what a request may ask for.
"""

from __future__ import annotations

import base64
import io
import math
import re
import secrets
import time
from dataclasses import fields

from ..errors import (
    BackendError,
    DeadlineExceededError,
    EngineError,
    ParamError,
    PromptError,
    RequestCancelledError,
    UnavailableError,
)
from ..request import SEED_MAX, GenerationParams
from ..tokenization import clean_prompts
from ..validation import is_int
from .config import ServeConfig

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
IGNORED_FIELDS = ("user", "quality", "style", "moderation", "background", "safety_identifier")
PARAM_FIELDS = tuple(f.name for f in fields(GenerationParams))  # steps, guidance_scale, ..., as named there
GENERATION_FIELDS = ("prompt", "model", "n", "size", "response_format", "output_format", "output_compression",
                     "stream", *PARAM_FIELDS, *IGNORED_FIELDS)
MAX_ROUTE_PROMPTS = 64
_MODEL = re.compile(r"^aptp(?::(?:expert-(\d+)|(dense)))?$")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
             404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
             413: "invalid_request_error",
             415: "invalid_request_error", 503: "server_error", 504: "timeout"}
    MAX_MESSAGE = 400  # what a client sent is echoed at most this long

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None, allow: str | None = None):
        if len(message) > self.MAX_MESSAGE:
            message = message[:self.MAX_MESSAGE - 3] + "..."
        if param is not None and len(param) > 64:
            param = param[:61] + "..."
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after
        self.allow = allow

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str] | None:
        h = {}
        if self.retry_after is not None:
            h["Retry-After"] = str(self.retry_after)
        if self.allow is not None:
            h["Allow"] = self.allow
        return h or None


def _string(d: dict, key: str, default: str) -> str:
    """d[key] as a string (default when absent or null); anything else (a list, a number, "") is a 400."""
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, str) or not v:
        raise ApiError(400, f"{key} must be a non-empty string, got {v!r}", param=key)
    return v


def _integer(d: dict, key: str, default, lo: int, hi: int):
    v = d.get(key, default)
    if v is None:
        return default
    if not is_int(v) or not lo <= v <= hi:
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
    expert = parse_model(_string(d, "model", "aptp"))
    n = _integer(d, "n", 1, 1, cfg.max_n)
    size = _string(d, "size", "auto")
    w, h = image_size
    if size not in ("auto", f"{w}x{h}"):
        raise ApiError(400, f"size {size!r} is not available: this export makes {w}x{h} images (or say 'auto')",
                       param="size")
    rf = _string(d, "response_format", "b64_json")
    if rf != "b64_json":
        raise ApiError(400, f"response_format {rf!r} is not supported: this server returns images inline, "
                            "use 'b64_json'", param="response_format")
    fmt = _string(d, "output_format", "png")
    if fmt not in OUTPUT_FORMATS:
        raise ApiError(400, f"output_format {fmt!r}: choose from {', '.join(OUTPUT_FORMATS)}", param="output_format")
    quality = _integer(d, "output_compression", 100, 0, 100)
    seed = _integer(d, "seed", None, 0, SEED_MAX - cfg.max_n)
    settings = {"steps": cfg.default_steps, "guidance_scale": cfg.default_guidance_scale,
                **{k: d[k] for k in PARAM_FIELDS if d.get(k) is not None},
                "seed": secrets.randbits(31) if seed is None else seed}
    try:
        params = GenerationParams(**settings).within(cfg.max_steps)
    except ParamError as e:
        raise ApiError(400, str(e), param=e.param) from None
    return {"submit": {"prompt": prompt, "n": n, "params": params, "expert": expert},
            "format": fmt, "quality": quality, "size": f"{w}x{h}"}


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
    return ApiError(400, str(e), param=getattr(e, "param", "prompt" if isinstance(e, PromptError) else None))


def result_error(e: EngineError, request_id: str = "") -> ApiError:
    """The answer to an error that ended an admitted request: 504 deadline, 503 cancelled (a drain cut it off,
    or the server shut down: retry), else 500 without the backend's internals (file paths, library text),
    which the server logs in full."""
    if isinstance(e, DeadlineExceededError):
        return ApiError(504, str(e), code="deadline_exceeded")
    if isinstance(e, RequestCancelledError):
        return ApiError(503, str(e), code="cancelled", retry_after=1)
    if isinstance(e, BackendError):
        return ApiError(500, f"image generation failed in the inference backend (request id {request_id}; the "
                             "server log has the details)", code="generation_failed")
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
    most = min(MAX_ROUTE_PROMPTS, config.max_route_prompts)  # more could never be admitted
    if isinstance(prompts, list) and len(prompts) > most:
        raise ApiError(400, f"prompt: {len(prompts)} prompts, at most {most}", param="prompt")
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
    d = manifest.sampling_defaults
    data = [{"id": "aptp", "object": "model", "created": 0, "owned_by": "aptp", "routed": True,
             "base_model": manifest.base_model, "experts": len(manifest.experts),
             "sampling": {"steps": d.steps, "guidance_scale": d.guidance_scale, "scheduler": manifest.scheduler.name}}]
    for e in manifest.experts:
        data.append({"id": model_id(e.id), "object": "model", "created": 0, "owned_by": "aptp", "expert": e.id,
                     "macs_fraction": e.macs_fraction, "share": e.share, "params": e.params, "precision": e.precision})
    if manifest.dense is not None:
        data.append({"id": "aptp:dense", "object": "model", "created": 0, "owned_by": "aptp", "expert": "dense",
                     "macs_fraction": 1.0})
    return {"object": "list", "data": data}
