"""Latency of one UNet evaluation per model and backend, side by side, against its MACs.

A "model under test" is the dense UNet or one expert, available as an ONNX graph (onnxruntime),
a TensorRT plan, and/or a torch module (eager). For every batch size the models of one backend
are timed in alternating rounds (benchmarks.timing.interleaved); `latency_fraction` is a model's
median over the dense model's median for the same backend and batch, to be read against
`macs_fraction`. The batch is the UNet batch of `prompts` prompts with classifier-free guidance,
i.e. 2 x prompts samples.

What is timed, per backend:
- "onnxruntime" (CPU) and "torch": wall clock of one call, host arrays in and out.
- "onnxruntime-cuda": wall clock of one `run_with_iobinding` with inputs and outputs resident on the
  GPU (no host copies; includes onnxruntime's launch overhead and its end-of-run stream sync).
- "tensorrt": GPU time between CUDA events around `execute_async_v3`, inputs resident on the GPU
  (`TensorRTSession.time_device`): the engine alone, no pageable copies, casts or host syncs. One
  session per model serves every batch size; all share one activation memory block.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engines.backends.ort import OrtSession, cuda_unavailable_reason

from .names import UNET_BACKENDS
from engines.backends.tensorrt import DeviceMemoryPool, TensorRTSession

from .timing import interleaved

PAIRED_KEYS = ("latency_fraction_paired", "latency_fraction_min", "cpu_ms_median", "cpu_fraction")

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
UNET_ADDED_INPUTS = ("text_embeds", "time_ids")  # SDXL-class UNets (engines.manifest)


@dataclass
class ModelUnderTest:
    name: str                      # "dense" or "expert_00", ...
    macs: float                    # MACs of one call, batch 1
    macs_fraction: float
    params: int = 0
    onnx: Path | None = None
    plan: Path | None = None
    load_torch: Callable[[], object] | None = None   # returns an eval-mode torch UNet
    extra: dict = field(default_factory=dict)
    ir: Path | None = None         # OpenVINO IR (.xml) written by `aptp quantize`
    precision: str = "fp32"        # of the IR ("int8" | "int8_weights")


@dataclass(frozen=True)
class InputShape:
    in_channels: int
    height: int
    width: int
    text_len: int
    context_dim: int
    text_embeds_dim: int = 0   # SDXL-class UNets: pooled text embedding width (0: no added inputs)
    time_ids_dim: int = 6
    caption_mask: bool = False  # PixArt: encoder_attention_mask [N, L] (int64 ones)
    pooled_dim: int = 0         # SD3: pooled_projections [N, P]


def unet_feeds(shape: InputShape, prompts: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of a CFG-doubled UNet call for `prompts` prompts; with `shape.text_embeds_dim` also SDXL's
    text_embeds (N(0, 1)) and time_ids (the default micro-conditioning of a square image of 8 x the latent:
    original size, crop (0, 0), target size); PixArt's caption mask (all tokens real) or SD3's pooled
    projections (N(0, 1)) where the shape says so."""
    rng = np.random.default_rng(seed)
    n = 2 * prompts
    feeds = {
        UNET_INPUTS[0]: rng.standard_normal((n, shape.in_channels, shape.height, shape.width), dtype=np.float32),
        UNET_INPUTS[1]: np.full((n,), 500.0, dtype=np.float32),
        UNET_INPUTS[2]: rng.standard_normal((n, shape.text_len, shape.context_dim), dtype=np.float32),
    }
    if shape.text_embeds_dim:
        h, w = 8 * shape.height, 8 * shape.width
        ids = np.array([h, w, 0, 0, h, w], dtype=np.float32)[:shape.time_ids_dim]
        feeds[UNET_ADDED_INPUTS[0]] = rng.standard_normal((n, shape.text_embeds_dim), dtype=np.float32)
        feeds[UNET_ADDED_INPUTS[1]] = np.tile(ids, (n, 1))
    if shape.caption_mask:
        feeds["encoder_attention_mask"] = np.ones((n, shape.text_len), dtype=np.int64)
    if shape.pooled_dim:
        feeds["pooled_projections"] = rng.standard_normal((n, shape.pooled_dim), dtype=np.float32)
    return feeds


def ort_callable(path: Path, feeds: dict, threads: int = 0):
    sess = OrtSession(path, "cpu", threads=threads)
    return lambda: sess.run(feeds)


def _ort_cuda_callable(path: Path, feeds: dict):
    return OrtSession(path, "cuda").resident_runner(feeds)


def openvino_callable(path: Path, feeds: dict, threads: int = 0):
    from engines.backends.openvino import OvSession

    sess = OvSession(path, threads=threads)
    return lambda: sess.run(feeds)


def torch_callable(module, feeds: dict):
    args = [torch.from_numpy(feeds[k]) for k in UNET_INPUTS]
    kwargs = {}
    if UNET_ADDED_INPUTS[0] in feeds:
        kwargs["added_cond_kwargs"] = {k: torch.from_numpy(feeds[k]) for k in UNET_ADDED_INPUTS}

    def call():
        with torch.inference_mode():
            return module(*args, return_dict=False, **kwargs)[0]

    return call


BACKENDS = UNET_BACKENDS


def available_backends(models: list[ModelUnderTest]) -> list[str]:
    out = []
    if all(m.onnx is not None for m in models):
        out.append("onnxruntime")
        if _cuda_works():
            out.append("onnxruntime-cuda")
    if all(m.load_torch is not None for m in models):
        out.append("torch")
    if all(m.plan is not None for m in models):
        out.append("tensorrt")
    if any(m.ir is not None for m in models) and all(m.onnx is not None for m in models):
        out.append("openvino-int8")
    return out


def bench_unets(models: list[ModelUnderTest], shape: InputShape, prompts_per_batch: list[int],
                backends: list[str], warmup: int = 2, repeats: int = 10, settle: int = 1,
                block: int = 3, threads: int = 0, progress=None) -> list[dict]:
    """One row per (model, backend, prompts): medians, p90 and fractions against the dense model.

    Models alternate in rounds of `settle` untimed and `block` timed calls each (benchmarks.timing.interleaved):
    onnxruntime sessions' spinning worker threads slow the next model's first calls, so a model is timed
    once it has the cores to itself, as in a server running one expert for a whole denoising loop.
    threads > 0 sets onnxruntime's intra-op threads and torch's threads for these timings (0: defaults).

    `models` must contain one named "dense" (the reference of latency_fraction)."""
    if not any(m.name == "dense" for m in models):
        raise ValueError("bench_unets needs the dense model as reference (name 'dense')")
    with _torch_threads(threads if "torch" in backends else 0):
        return _bench_unets(models, shape, prompts_per_batch, backends, warmup, repeats, settle, block, threads,
                            progress)


@contextlib.contextmanager
def _torch_threads(threads: int):
    """torch.set_num_threads(threads) inside the block (0: leave torch alone); restored on exit."""
    if not threads:
        yield
        return

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cuda_works() -> bool:
    return cuda_unavailable_reason() is None


def _bench_tensorrt(models, shape, prompts_per_batch, warmup, repeats, progress) -> list[dict]:
    """Device-side timing of every plan (CUDA events, resident inputs), one session per model."""
    pool = DeviceMemoryPool()
    sessions = {m.name: TensorRTSession(m.plan, device_memory=pool) for m in models}
    rows = []
    try:
        for prompts in prompts_per_batch:
            feeds = unet_feeds(shape, prompts)
            times = {}
            for _ in range(2):  # two alternating passes: a clock change hits every model alike
                for m in models:
                    times.setdefault(m.name, []).extend(sessions[m.name].time_device(feeds, warmup, max(1, repeats // 2)))
            dense = np.asarray(times["dense"])
            for m in models:
                t = np.asarray(times[m.name])
                med = float(np.median(t))
                rows.append({
                    "expert": m.name, "backend": "tensorrt", "batch": 2 * prompts, "prompts": prompts,
                    "macs": m.macs, "macs_fraction": m.macs_fraction, "params": m.params,
                    "latency_ms_median": med, "latency_ms_p90": float(np.percentile(t, 90)),
                    "latency_ms_min": float(t.min()), "repeats": len(t), "timing": "cuda-events",
                    "latency_fraction": med / float(np.median(dense)),
                    "latency_over_macs": (med / float(np.median(dense))) / m.macs_fraction,
                    "latency_fraction_paired": float(np.median(t / dense)),
                    "latency_fraction_min": float(t.min() / dense.min()),
                    "cpu_ms_median": float("nan"), "cpu_fraction": float("nan"), **m.extra,
                })
            if progress is not None:
                progress("tensorrt", prompts)
    finally:
        for sess in sessions.values():
            sess.close()
        pool.close()
    return rows


def _bench_unets(models, shape, prompts_per_batch, backends, warmup, repeats, settle, block, threads,
                 progress) -> list[dict]:
    torch_modules = {}
    rows = []
    for backend in backends:
        if backend == "tensorrt":
            rows += _bench_tensorrt(models, shape, prompts_per_batch, warmup, repeats, progress)
            continue
        for prompts in prompts_per_batch:
            feeds = unet_feeds(shape, prompts)
            fns = {}
            for m in models:
                if backend == "onnxruntime":
                    fns[m.name] = ort_callable(m.onnx, feeds, threads=threads)
                elif backend == "onnxruntime-cuda":
                    fns[m.name] = _ort_cuda_callable(m.onnx, feeds)
                elif backend == "openvino-int8":
                    fns[m.name] = (openvino_callable(m.ir, feeds, threads) if m.ir is not None
                                   else ort_callable(m.onnx, feeds, threads=threads))
                elif backend == "torch":
                    if m.name not in torch_modules:
                        torch_modules[m.name] = m.load_torch()
                    fns[m.name] = torch_callable(torch_modules[m.name], feeds)
                else:
                    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
            calls = {k: [] for k in fns}
            timings = interleaved({k: recorded_calls(fn, calls[k]) for k, fn in fns.items()}, warmup=warmup,
                                  repeats=repeats, settle=settle, untimed=fns, block=block)
            dense = timings["dense"].median_ms
            paired = paired_timings(calls, 0)
            for m in models:
                t = timings[m.name]
                rows.append({
                    "timing": "wall-resident" if backend == "onnxruntime-cuda" else "wall",
                    "expert": m.name, "backend": backend, "batch": 2 * prompts, "prompts": prompts,
                    "precision": m.precision if backend == "openvino-int8" and m.ir is not None else "fp32",
                    "macs": m.macs, "macs_fraction": m.macs_fraction, "params": m.params,
                    **t.as_dict(), "latency_fraction": t.median_ms / dense,
                    "latency_over_macs": (t.median_ms / dense) / m.macs_fraction,
                    **paired[m.name], **m.extra,
                })
            if progress is not None:
                progress(backend, prompts)
            del fns
    return rows


def recorded_calls(fn, out: list):
    """`fn` that also appends (wall s, process CPU s) of every call to `out`."""

    def call():
        c, t = time.process_time(), time.perf_counter()
        r = fn()
        out.append((time.perf_counter() - t, time.process_time() - c))
        return r

    return call


def paired_timings(calls: dict[str, list], warmup: int, ref: str = "dense") -> dict[str, dict]:
    """Estimators of the latency fraction that a busy shared machine disturbs less than the ratio of medians:
    the median over rounds of (model / `ref` in the same round), the ratio of the fastest calls, and the
    process CPU time per call (all threads; time spent descheduled does not count)."""
    wall = {k: np.array([w for w, _ in v[warmup:]]) for k, v in calls.items()}
    cpu = {k: np.array([c for _, c in v[warmup:]]) for k, v in calls.items()}
    wd, cd = wall[ref], cpu[ref]
    return {k: {"latency_fraction_paired": float(np.median(wall[k] / wd)),
                "latency_fraction_min": float(wall[k].min() / wd.min()),
                "cpu_ms_median": float(np.median(cpu[k]) * 1e3),
                "cpu_fraction": float(np.median(cpu[k]) / np.median(cd))} for k in calls}


def speedups(rows: list[dict], slow: str = "torch", fast: str = "onnxruntime") -> list[dict]:
    """Per (model, batch): median latency of `slow` over `fast` backend."""
    idx = {(r["expert"], r["batch"], r["backend"]): r for r in rows}
    out = []
    for (name, batch, backend), r in idx.items():
        if backend != fast or (name, batch, slow) not in idx:
            continue
        s = idx[(name, batch, slow)]
        out.append({"expert": name, "batch": batch, f"{slow}_ms": s["latency_ms_median"],
                    f"{fast}_ms": r["latency_ms_median"],
                    "speedup": s["latency_ms_median"] / r["latency_ms_median"]})
    return out
