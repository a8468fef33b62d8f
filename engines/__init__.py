"""Lightweight APTP runtime: routes prompts to per-expert ONNX/TensorRT engines. Never imports torch.

    from engines import Runtime
    rt = Runtime.load("export/NAME", provider="cpu")   # or "cuda", "tensorrt"
    rt.route(["a red circle"])                         # -> expert ids
    images = rt.generate(prompts, steps=25, guidance_scale=7.5, seed=0)

Dependencies: numpy, onnxruntime, tokenizers, pillow (the `cpu` extra, or `gpu`); TensorRT
plans additionally need the `tensorrt` extra. Names are imported lazily so `import engines` is cheap.
"""

from importlib import import_module

_LAZY = {
    "Runtime": ".runtime",
    "RouteResult": ".runtime",
    "GenerationResult": ".runtime",
    "Manifest": ".manifest",
    "read_manifest": ".manifest",
    "verify_files": ".manifest",
    "FORMAT_VERSION": ".manifest",
    "make_scheduler": ".schedulers",
    "GenerationParams": ".request",
    "Batcher": ".serving.batching",
    "Ticket": ".serving.batching",
    "ImageResult": ".serving.batching",
    "ServeConfig": ".serving.config",
    "EngineError": ".errors",
    "ManifestError": ".errors",
    "IntegrityError": ".errors",
    "PromptError": ".errors",
    "ParamError": ".errors",
    "BackendError": ".errors",
    "SchedulerConfigError": ".errors",
    "UnavailableError": ".errors",
    "DeadlineExceededError": ".errors",
    "RequestCancelledError": ".errors",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
