"""`Runtime`: load an export directory, route prompts to experts, generate images per expert.

    rt = Runtime.load("export/NAME", provider="cpu")      # checks the manifest and every sha256
    rt.route(["a red circle"])                            # -> [expert id]
    images = rt.generate(prompts, steps=25, guidance_scale=7.5, seed=0)

Sessions are opened lazily (an expert's graph is loaded the first time a prompt is routed to it)
and cached. Before a session is opened its file is checked again against the manifest (size and
modification time against what was verified at load; a changed file is hashed again), so a file
corrupted after loading is refused too and nothing is generated from it.

A Runtime may be shared by threads (the server's workers): lazy opening of sessions, the tokenizer and
the unconditional context happens under one lock, and the sessions themselves are thread-safe
(onnxruntime's `InferenceSession.run` may be called concurrently).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import Session, check_provider, open_session
from .backends.cuda import plan_environment, plan_mismatch
from .backends.ort import cuda_unavailable_reason
from .backends.tensorrt import DeviceMemoryPool
from .denoise import DEFAULT_BATCH_SIZE, TextCondition, denoise, initial_noise, unet_batch
from .errors import BackendError, EngineError
from .images import decode, to_pil
from .manifest import (
    ROUTER_INPUTS,
    ROUTER_OUTPUTS,
    TEXT_ENCODER_INPUTS,
    TEXT_ENCODER_OUTPUTS,
    TEXT_ENCODER_POOLED,
    UNET_ADDED_INPUTS,
    UNET_INPUTS,
    UNET_MASK_INPUT,
    UNET_POOLED_INPUT,
    UNET_OUTPUTS,
    TOKENIZER_IDS,
    VAE_DECODER_INPUTS,
    VAE_DECODER_OUTPUTS,
    FileRef,
    Manifest,
    read_manifest,
    verify_file,
)
from .request import GenerationParams
from .validation import is_int
from .schedulers import make_scheduler
from .tokenization import PromptTokenizer, clean_prompts


@dataclass
class RouteResult:
    """Routing of a list of prompts: expert ids [B] and router scores [B, K] (higher = closer)."""

    expert_ids: list[int]
    scores: np.ndarray


@dataclass
class GenerationResult:
    """Images in prompt order with what made each one."""

    images: list  # PIL images
    expert_ids: list  # int per image, or "dense"
    seeds: list[int]
    prompts: list[str]  # the cleaned prompts actually used
    scheduler: str
    steps: int
    guidance_scale: float
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    guidance_rescale: float = 0.0

    def records(self) -> list[dict]:
        """One JSON-ready record per image (index, prompt, expert, seed, sampler settings)."""
        return [{"index": i, "prompt": p, "expert": e, "seed": s, "scheduler": self.scheduler,
                 "steps": self.steps, "guidance_scale": self.guidance_scale,
                 "guidance_rescale": self.guidance_rescale}
                for i, (p, e, s) in enumerate(zip(self.prompts, self.expert_ids, self.seeds, strict=True))]


class Runtime:
    """The deployable APTP runtime over one export directory (see the module doc)."""

    def __init__(self, export_dir: str | os.PathLike, manifest: Manifest, provider: str = "cpu", threads: int = 0):
        # (Runtime.load resolves provider=None to what the manifest records)
        self.export_dir = Path(export_dir)
        self.manifest = manifest
        self.provider = provider
        self.threads = int(threads)
        self._sessions: dict[str, Session] = {}
        self._verified: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) when hashed
        self._tokenizer: PromptTokenizer | None = None
        self._uncond: TextCondition | None = None
        # onnxruntime provider of the graphs without a TensorRT plan (router, text encoder, VAE decoder)
        self.ort_provider = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
        self._device_memory: DeviceMemoryPool | None = None  # TensorRT activations, shared by the plans
        self._lock = threading.RLock()  # guards the lazy caches above (re-entrant: _session -> _recheck)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, export_dir: str | os.PathLike, provider: str | None = None, verify: bool = True,
             threads: int = 0) -> Runtime:
        """Read `export_dir/manifest.json`, check its format version and (with `verify`) the size and
        sha256 of every file it lists. Raises ManifestError / IntegrityError naming the file, or
        BackendError if `provider` ("cpu" | "cuda" | "tensorrt" | "openvino") cannot run here; None = what
        the export records ("openvino" for an export with OpenVINO IR files, i.e. one `aptp quantize`
        wrote, else "cpu"). `threads`: intra-op threads per session (0 = one per core)."""
        if not is_int(threads) or threads < 0:
            raise EngineError(f"threads must be a non-negative integer, got {threads!r}")
        if provider is not None:
            check_provider(provider)  # a provider that cannot work here is refused before any file is read
        manifest = read_manifest(export_dir)
        if provider is None:
            provider = default_provider(manifest)
            try:
                check_provider(provider)
            except BackendError as e:
                if provider != "openvino":
                    raise
                provider = "cpu"  # the export's ONNX graphs still run; say why the int8 IRs do not
                warnings.warn(f"{export_dir}: its int8 OpenVINO engines cannot run here ({e}); running its fp32 "
                              "ONNX graphs on onnxruntime instead", RuntimeWarning, stacklevel=2)
                check_provider(provider)
        rt = cls(export_dir, manifest, provider, threads)
        if provider == "tensorrt":
            missing = [f"expert {e.id}" for e in manifest.experts if "tensorrt" not in e.files]
            if missing:
                raise EngineError(f"{export_dir}: provider 'tensorrt' needs TensorRT plans, none for "
                                  f"{', '.join(missing)}; export with --backend tensorrt")
            rt._check_plan_environment()
            reason = cuda_unavailable_reason()
            if reason is not None:
                rt.ort_provider = "cpu"
                warnings.warn(f"provider 'tensorrt': the router, text encoder and VAE decoder run on onnxruntime's "
                              f"CPU provider ({reason})", RuntimeWarning, stacklevel=2)
        if verify:
            for ref in manifest.all_files():
                rt._verify(ref)
        return rt

    def _check_plan_environment(self) -> None:
        """Refuse plans built with another TensorRT version or for another compute capability (recorded in
        the manifest since format version 2; older manifests cannot be checked before the first call)."""
        recorded = self.manifest.tensorrt
        if recorded is None:
            return
        error, warning = plan_mismatch(recorded.to_dict(), plan_environment())
        if error:
            raise BackendError(f"{self.export_dir}: {error}")
        if warning:
            warnings.warn(f"{self.export_dir}: {warning}", RuntimeWarning, stacklevel=3)

    @property
    def part_providers(self) -> dict[str, str]:
        """Where each part runs: "tensorrt", "openvino-int8" (precision of its IR), "onnxruntime-cuda" or
        "onnxruntime-cpu" per part name ("experts" when all experts run alike, else "expert_00", ...)."""
        ort = f"onnxruntime-{self.ort_provider}"
        parts = {"router": ort, "text_encoder": ort}
        unets = {f"expert_{e.id:02d}": self._unet_backend(e.files, e.precision) for e in self.manifest.experts}
        if len(set(unets.values())) == 1:
            parts["experts"] = next(iter(unets.values()))
        else:
            parts.update(unets)
        if self.manifest.vae_decoder is not None:
            parts["vae_decoder"] = ort
        if self.manifest.dense is not None:
            parts["dense"] = self._unet_backend(self.manifest.dense.files, "fp32")
        return parts

    def _unet_backend(self, files: dict[str, FileRef], precision: str) -> str:
        kind = self._unet_kind(files)
        if kind == "onnx":
            return f"onnxruntime-{self.ort_provider}"
        return "tensorrt" if kind == "tensorrt" else f"openvino-{precision}"

    def _unet_kind(self, files: dict[str, FileRef]) -> str:
        """Which file of a UNet part this runtime opens: a TensorRT plan, an OpenVINO IR or the ONNX graph."""
        if self.provider in ("tensorrt", "openvino") and self.provider in files:
            return self.provider
        return "onnx"

    def _verify(self, ref: FileRef) -> None:
        verify_file(self.export_dir, ref)
        st = (self.export_dir / ref.path).stat()
        self._verified[ref.path] = (st.st_size, st.st_mtime_ns)

    def _recheck(self, ref: FileRef) -> None:
        path = self.export_dir / ref.path
        try:
            st = path.stat()
            unchanged = self._verified.get(ref.path) == (st.st_size, st.st_mtime_ns)
        except OSError:
            unchanged = False
        if not unchanged:
            self._verify(ref)

    def _session(self, key: str, files: dict[str, FileRef], inputs: tuple[str, ...],
                 outputs: tuple[str, ...]) -> Session:
        with self._lock:
            return self._open_session(key, files, inputs, outputs)

    def _open_session(self, key: str, files: dict[str, FileRef], inputs: tuple[str, ...],
                      outputs: tuple[str, ...]) -> Session:
        if key not in self._sessions:
            kind = self._unet_kind(files)
            used = {"onnx": ("onnx", "onnx_data"), "tensorrt": ("tensorrt",),
                    "openvino": ("openvino", "openvino_bin")}[kind]
            for k, ref in files.items():
                if k in used:
                    self._recheck(ref)
            if kind == "tensorrt" and self._device_memory is None:
                self._device_memory = DeviceMemoryPool()
            self._sessions[key] = open_session(self.export_dir / files[kind].path, self.provider, kind,
                                               inputs, outputs, threads=self.threads, ort_provider=self.ort_provider,
                                               device_memory=self._device_memory)
        return self._sessions[key]

    def decode(self, latents: np.ndarray) -> list:
        """PIL images of final latents [B, C, H, W] (through the VAE decoder when the export has one)."""
        m = self.manifest
        vae = None
        if m.vae_decoder is not None:
            vae = self._session("vae_decoder", m.vae_decoder.files, VAE_DECODER_INPUTS, VAE_DECODER_OUTPUTS)
        scaling, shift = (m.vae_decoder.scaling_factor, m.vae_decoder.shift_factor) if m.vae_decoder else (1.0, 0.0)
        return to_pil(decode(latents, vae, scaling, shift))

    def unet(self, expert_id) -> Session:
        """The UNet session of expert `expert_id` (an int id or "dense"), opened (and its files checked) once."""
        if expert_id == "dense":
            if self.manifest.dense is None:
                raise EngineError(f"{self.export_dir}: no dense model was exported (export with --with-dense)")
            files = self.manifest.dense.files
            if self.provider == "tensorrt" and "tensorrt" not in files:
                raise BackendError(f"{self.export_dir}: provider 'tensorrt' needs a TensorRT plan of the dense model "
                                   "(export with --backend tensorrt --with-dense); it would run on onnxruntime instead")
        else:
            files = self.manifest.expert(int(expert_id)).files
        # sample and timestep are always read; the text context is not by an expert without transformers, nor
        # PixArt's caption mask by an expert whose cross-attention was pruned away (the exporter drops unused
        # inputs, and only the inputs a graph has are fed)
        inputs = UNET_INPUTS[:2] + (UNET_ADDED_INPUTS if self.manifest.added_cond is not None else ()) \
            + ((UNET_POOLED_INPUT,) if self.manifest.family == "sd3" else ())  # SD3's adaLN always reads it
        return self._session(f"expert:{expert_id}", files, inputs, UNET_OUTPUTS)

    @property
    def tokenizer(self) -> PromptTokenizer:
        with self._lock:
            return self._load_tokenizer()

    def _load_tokenizer(self) -> PromptTokenizer:
        if self._tokenizer is None:
            info = self.manifest.tokenizer
            for ref in info.files.values():
                self._recheck(ref)
            def path(key):
                ref = info.files.get(key)
                return None if ref is None else self.export_dir / ref.path

            self._tokenizer = PromptTokenizer(path("json"), self.manifest.text_len, self.manifest.router.max_length,
                                              self.export_dir / info.router_file.path, path("json_2"), path("json_3"),
                                              lengths=info.lengths)
        return self._tokenizer

    def new_scheduler(self, name: str | None = None):
        """A fresh sampler `name` (default: the export's) on the export's scheduler config; a flow sampler on a
        config with use_dynamic_shifting gets the export's resolution shift mu (the manifest's scheduler.mu)."""
        info = self.manifest.scheduler
        return make_scheduler(name or info.name, info.config, mu=info.mu)

    @property
    def num_experts(self) -> int:
        return len(self.manifest.experts)

    # -- text ------------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str], batch_size: int = 64, clean: bool = True) -> np.ndarray:
        """UNet text context [B, text_len, hidden] float32 for prompts (validated unless `clean` is False:
        the caller passes prompts it already cleaned with engines.tokenization.clean_prompts)."""
        return self._encode(prompts, batch_size, clean)[0]

    def _encode(self, prompts: Sequence[str], batch_size: int = 64,
                clean: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(context [B, L, E], pooled text_embeds [B, P] or None, the first tokenizer's mask [B, S] int64: PixArt's
        caption mask, S = L) of the prompts."""
        prompts = clean_prompts(prompts) if clean else list(prompts)
        pooled = self.manifest.text_encoder.pooled_dim is not None
        # input_ids is required (input_ids_2 / _3 too where the export has that tokenizer: SDXL, SD3);
        # attention_mask is optional: a text encoder run without a mask (CLIP in Stable Diffusion pipelines) is
        # exported without that input
        keys = self.tokenizer.text_keys
        te = self._session("text_encoder", self.manifest.text_encoder.files,
                           tuple(TOKENIZER_IDS[k] for k in keys),
                           TEXT_ENCODER_OUTPUTS + ((TEXT_ENCODER_POOLED,) if pooled else ()))
        contexts, pools, masks = [], [], []
        for i in range(0, len(prompts), batch_size):
            part = prompts[i:i + batch_size]
            ids, mask = self.tokenizer.unet_tokens(part)
            masks.append(mask)
            feeds = {TEXT_ENCODER_INPUTS[0]: ids, TEXT_ENCODER_INPUTS[1]: mask}
            for key in keys[1:]:
                feeds[TOKENIZER_IDS[key]] = self.tokenizer.unet_tokens(part, key)[0]
            feeds = {k: v for k, v in feeds.items() if k in te.input_names}
            out = te.run(feeds)
            contexts.append(out[TEXT_ENCODER_OUTPUTS[0]])
            if pooled:
                pools.append(out[TEXT_ENCODER_POOLED])
        context = np.concatenate(contexts).astype(np.float32, copy=False)
        return (context, (np.concatenate(pools).astype(np.float32, copy=False) if pooled else None),
                np.concatenate(masks).astype(np.int64, copy=False))

    def _condition(self, context: np.ndarray, pooled: np.ndarray | None, mask: np.ndarray) -> TextCondition:
        if self.manifest.family == "pixart":  # the transformer masks the caption's padding in cross-attention
            return TextCondition(context, {UNET_MASK_INPUT: mask.astype(np.int64, copy=False)})
        if self.manifest.family == "sd3":  # the MMDiT reads the CLIPs' pooled projection
            return TextCondition(context, {UNET_POOLED_INPUT: pooled})
        added = self.manifest.added_cond
        if added is None:
            return TextCondition(context)
        time_ids = np.tile(np.asarray(added.time_ids(), dtype=np.float32), (context.shape[0], 1))
        return TextCondition(context, {UNET_ADDED_INPUTS[0]: pooled, UNET_ADDED_INPUTS[1]: time_ids})

    def condition(self, prompts: Sequence[str], batch_size: int = 64, clean: bool = True) -> TextCondition:
        """Everything the UNet reads about the prompts: the text context and, for SDXL exports, the pooled
        text embedding and the size conditioning time_ids (the export's image size, no crop); for PixArt
        exports the caption's padding mask; for SD3 exports the pooled projection. `clean`: as in `encode_text`."""
        return self._condition(*self._encode(prompts, batch_size, clean))

    def uncond(self) -> TextCondition:
        """The unconditional condition for classifier-free guidance, one row: the prompt "" or, when the export says so (SDXL's
        force_zeros_for_empty_prompt), zeros of the same shapes."""
        with self._lock:
            if self._uncond is None:
                context, pooled, mask = self._encode([""], clean=False)
                if self.manifest.text_encoder.uncond == "zeros":
                    context = np.zeros_like(context)
                    pooled = None if pooled is None else np.zeros_like(pooled)
                self._uncond = self._condition(context, pooled, mask)
            return self._uncond

    # -- routing ---------------------------------------------------------------------------------
    def route_scores(self, prompts: str | Sequence[str], batch_size: int = 64) -> RouteResult:
        """Router scores [B, K] and the chosen expert (argmax) per prompt."""
        prompts = clean_prompts(prompts)
        _check_batch_size(batch_size)
        router = self._session("router", self.manifest.router.files, ROUTER_INPUTS, ROUTER_OUTPUTS)
        scores = []
        for i in range(0, len(prompts), batch_size):
            ids, mask = self.tokenizer.router_tokens(prompts[i:i + batch_size])
            scores.append(router.run({ROUTER_INPUTS[0]: ids, ROUTER_INPUTS[1]: mask})[ROUTER_OUTPUTS[0]])
        s = np.concatenate(scores).astype(np.float32, copy=False)
        if s.ndim != 2 or s.shape[1] != self.num_experts:
            raise EngineError(f"router returned scores of shape {list(s.shape)}, expected [B, {self.num_experts}]")
        if not np.isfinite(s).all():
            raise EngineError("router returned non-finite scores")
        return RouteResult(expert_ids=[int(k) for k in s.argmax(axis=1)], scores=s)

    def route(self, prompts: str | Sequence[str], batch_size: int = 64) -> list[int]:
        """Expert id per prompt (argmax of the router's scores)."""
        return self.route_scores(prompts, batch_size).expert_ids

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str], steps: int | None = None, guidance_scale: float | None = None,
                 seed: int | Sequence[int] = 0, scheduler: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, expert: int | str | None = None,
                 guidance_rescale: float = 0.0) -> list:
        """PIL images in prompt order (see `generate_with_info` for arguments and provenance)."""
        return self.generate_with_info(prompts, steps, guidance_scale, seed, scheduler, batch_size, expert,
                                       guidance_rescale=guidance_rescale).images

    def generate_with_info(self, prompts: str | Sequence[str], steps: int | None = None,
                           guidance_scale: float | None = None,
                           seed: int | Sequence[int] = 0, scheduler: str | None = None,
                           batch_size: int = DEFAULT_BATCH_SIZE, expert: int | str | None = None, progress=None,
                           guidance_rescale: float = 0.0, params: GenerationParams | None = None) -> GenerationResult:
        """Route, group prompts by expert, denoise each group with CFG, decode.

        Args:
            prompts: a string or list of strings (validated, see engines.tokenization).
            steps, guidance_scale, seed, scheduler, guidance_rescale: the sampler settings (steps and
                guidance_scale None: the export's recommended ones, `sampling_defaults`), checked as an
                engines.request.GenerationParams (or pass `params`, which then replaces them): steps >= 1;
                guidance_scale in [0, 100] (<= 1 disables guidance); seed int s (prompt i uses s + i) or one
                int per prompt; scheduler "ddim" | "pndm" | "euler" ("flow_euler" for a flow-matching
                export), or None for the manifest's.
            batch_size: most prompts per UNet call (the UNet batch is twice that with CFG); lowered to
                what a TensorRT plan's profile allows.
            expert: None to route; an expert id or "dense" to force one model for every prompt.
            progress: optional callable(done_model_calls, total_model_calls).
        Returns: GenerationResult with images, the expert of each image and the seeds used.
        """
        t0 = time.perf_counter()
        prompts = clean_prompts(prompts)
        if params is None:
            d = self.manifest.sampling_defaults
            params = GenerationParams(d.steps if steps is None else steps,
                                      d.guidance_scale if guidance_scale is None else guidance_scale, guidance_rescale,
                                      tuple(seed) if isinstance(seed, list) else seed, scheduler)
        seeds = params.seeds(len(prompts))
        _check_batch_size(batch_size)
        sched_name = params.scheduler_or(self.manifest.scheduler.name)
        probe = self.new_scheduler(sched_name)
        probe.set_timesteps(params.steps)  # validates config and steps before any work
        calls_per_batch = len(probe.timesteps)
        if expert is not None and expert != "dense":
            if not is_int(expert):
                raise EngineError(f"expert must be an int id or 'dense', got {expert!r}")
            self.manifest.expert(int(expert))

        timings = {}
        t = time.perf_counter()
        if expert is None:
            ids: list = self.route(prompts)
        else:
            ids = [expert if expert == "dense" else int(expert)] * len(prompts)
        timings["route"] = time.perf_counter() - t
        t = time.perf_counter()
        cond = self.condition(prompts, clean=False)
        uncond = self.uncond()
        timings["text"] = time.perf_counter() - t

        m = self.manifest
        shape = (m.in_channels, *m.sample_size)
        images: list = [None] * len(prompts)
        groups: dict = {}
        for i, e in enumerate(ids):
            groups.setdefault(e, []).append(i)
        # open every needed UNet before any denoising: a plan that cannot load fails now, not halfway
        unets = {e: self.unet(e) for e in groups}
        chunk_size = {e: self._prompts_per_call(u, batch_size, params.guidance_scale) for e, u in unets.items()}
        n_batches = sum((len(v) + chunk_size[e] - 1) // chunk_size[e] for e, v in groups.items())
        done = [0]

        def tick(_i, _total):
            done[0] += 1
            if progress is not None:
                progress(done[0], n_batches * calls_per_batch)

        t = time.perf_counter()
        for e, idx in groups.items():
            unet, step = unets[e], chunk_size[e]
            for j in range(0, len(idx), step):
                chunk = idx[j:j + step]
                noise = initial_noise([seeds[i] for i in chunk], shape)
                latents = denoise(unet, self.new_scheduler(sched_name), noise, cond.take(chunk),
                                  uncond, params, progress=tick)
                for i, img in zip(chunk, self.decode(latents), strict=True):
                    img.info["aptp_expert"] = str(e)
                    images[i] = img
        timings["denoise"] = time.perf_counter() - t
        return GenerationResult(images=images, expert_ids=ids, seeds=seeds, prompts=prompts,
                                scheduler=sched_name, steps=params.steps, guidance_scale=params.guidance_scale,
                                seconds=time.perf_counter() - t0, timings=timings,
                                guidance_rescale=params.guidance_rescale)


    @staticmethod
    def _prompts_per_call(unet: Session, batch_size: int, guidance_scale: float) -> int:
        """`batch_size`, lowered so that the UNet batch fits the session's `max_batch` (a plan's profile)."""
        limit = getattr(unet, "max_batch", None)
        if limit is None:
            return int(batch_size)
        per_prompt = unet_batch(1, guidance_scale)
        if limit < per_prompt:
            raise BackendError(f"the UNet's profile allows batches of at most {limit}, a prompt needs {per_prompt}")
        return max(1, min(int(batch_size), limit // per_prompt))


def default_provider(manifest: Manifest) -> str:
    """The provider an export runs on when the caller names none: "openvino" when it has OpenVINO IR files
    (written by `aptp quantize`), else "cpu"."""
    parts = [e.files for e in manifest.experts] + ([manifest.dense.files] if manifest.dense else [])
    return "openvino" if any("openvino" in f for f in parts) else "cpu"


def _check_batch_size(batch_size) -> None:
    if not is_int(batch_size) or batch_size < 1:
        raise EngineError(f"batch_size must be a positive integer, got {batch_size!r}")
