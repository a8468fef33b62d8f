"""The export manifest: what an export directory holds and how the runtime checks it.

`manifest.json` (format version 2) sits at the root of an export directory:

    {
      "format_version": 2,
      "base_model": "toy-teacher",            # free text naming the dense model the experts come from
      "created_by": "aptp 0.1.0",
      "precision": "fp32" | "fp16",           # of the graphs' internals; graph inputs/outputs stay fp32
      "scheduler": {"name": "pndm", "config": {...diffusers scheduler config...},
                    "mu": 0.7?},              # flow_euler with use_dynamic_shifting: the resolution shift for the
                                              # export's fixed sample size (what the SD3 pipeline computes)
      "sampling": null | {"steps": 25, "guidance_scale": 3.0},  # what a caller who names none gets (format 4;
                                              # from the model's sampling.json at export, or the export flags)
      "budget": 0.6 | null,                   # target MACs fraction of the pruning run
      "dense_macs": 1.23e9,                   # MACs of one dense UNet call, batch 1, at sample_size
      "text_len": 16,                         # token length of the UNet's text context
      "sample_size": [32, 32],                # UNet input height, width (latent pixels if latent)
      "in_channels": 3,                       # UNet input channels (latent channels if latent)
      "latent": false,
      "router": {"files": {"onnx": FILE}, "max_length": 256, "num_experts": 2, "embedding_dim": 384,
                 "codes": FILE | null},
      "family": "pixel" | "sd" | "sdxl" | "pixart" | "sd3",  # which inputs its graphs take (format 3; pixart:
                                              # the transformer also reads encoder_attention_mask [N, L] int64;
                                              # sd3: pooled_projections [N, P])
      "text_encoder": {"files": {"onnx": FILE}, "hidden_size": 384,
                       "pooled_dim": 1280?,   # SDXL, SD3: the graph also gives text_embeds [B, pooled_dim]
                       "uncond": "empty_prompt" | "zeros"},  # how the unconditional condition is made
      "added_cond": null | {"text_embeds_dim": 1280, "image_size": [1024, 1024]},  # SDXL's extra UNet inputs
      "vae_decoder": null | {"files": {"onnx": FILE}, "scaling_factor": 0.18215,
                             "shift_factor": 0.0609?},  # SD3: latents / scaling_factor + shift_factor decode
      "tokenizer": {"files": {"json": FILE, "json_2": FILE?, "json_3": FILE?, "router_json": FILE?},
                    "lengths": {"json": 77, "json_2": 77, "json_3": 256}?},  # json_2: SDXL's and SD3's second
                                              # text encoder's; json_3: SD3's T5; router_json: when the router's
                                              # prompt encoder tokenises differently (CLIP UNet + MiniLM router);
                                              # lengths: the tokens each pads to when not text_len (SD3)
      "experts": [{"id": 0, "macs": 6.1e8, "macs_fraction": 0.5, "params": 1234, "share": 0.4,
                   "files": {"onnx": FILE, "onnx_data": FILE?, "tensorrt": FILE?,
                             "openvino": FILE?, "openvino_bin": FILE?},   # OpenVINO IR .xml + its .bin
                   "quantization": null | {"precision": "int8" | "int8_weights" | "fp32", ...}}, ...],
                                              # what `aptp quantize` chose for the expert's OpenVINO IR and why
                                              # (calibration, fidelity, guard); format 4
      "dense": null | {"macs": ..., "params": ..., "files": {...}},
      "tensorrt": null | {"version": "10.8.0.43", "gpu": "NVIDIA H200", "compute_capability": "9.0",
                          "tf32": false},     # where the plans were built (required when any is listed)
      "openvino": null | {"version": "2026.4.1", "nncf": "3.4.0"},  # what wrote the IR files (format 4;
                                              # required when any is listed)
      "info": {...}                           # free-form provenance (run name, config); not interpreted
    }

Format versions: 2 added `tensorrt` (a plan only deserializes with the TensorRT version that built
it and only runs on GPUs of the same compute capability, so the runtime checks both before opening
a plan). 3 added `family`, `added_cond`, `text_encoder.pooled_dim` / `.uncond` and `tokenizer.json_2`
(SDXL-class UNets; later also the families pixart and sd3, with sd3's `scheduler.mu`,
`vae_decoder.shift_factor`, `tokenizer.json_3` and `tokenizer.lengths`, keys only an sd3 export writes). 4 added OpenVINO IR files (`openvino`, `openvino_bin`) with per-expert
`quantization`, the top-level `openvino` (aptp quantize) and `sampling` (the model's recommended
steps and guidance scale, used when a caller gives none). This reader also reads versions 1 and 2 (no `tensorrt` key in 1: plans then go
unchecked until their first call; no `family` before 3: it is "sd" for a latent model, "pixel"
otherwise, and the unconditional prompt is ""); a version it does not know is refused.

where FILE = {"path": "experts/expert_00.onnx", "sha256": "<64 hex>", "bytes": 123}, paths relative
to the export directory. Every file the runtime reads is listed with its sha256; `verify_files`
checks them all before anything runs. Unknown keys are rejected (the format version says what a
reader can expect); `info` is the place for anything else.

The graphs' interface is part of the format (names below; token ids and masks int64, the rest
float32): UNet (sample [N,C,H,W], timestep [N] float, encoder_hidden_states [N,L,E]) -> out_sample,
SDXL's UNet also (text_embeds [N,P], time_ids [N,6]); text encoder and router (input_ids,
attention_mask [B,S]) -> last_hidden_state [B,S,E] / scores [B,K] + embedding [B,E], SDXL's text
encoder (input_ids, input_ids_2 [B,S], the two tokenizers' ids) -> last_hidden_state [B,S,E1+E2]
(both encoders' penultimate states) + text_embeds [B,P], SD3's text encoder (input_ids, input_ids_2 [B,S1], the
CLIP tokenizers' ids, input_ids_3 [B,S3], T5's, absent without T5) -> last_hidden_state [B,S1+S3,E] (both CLIPs'
penultimate states concatenated and zero-padded to T5's width E, then T5's states, zeros without T5) + text_embeds
[B,P] (both CLIPs' pooled projections); SD3's transformer also reads pooled_projections [N,P]; VAE decoder
latent_sample [B,C,h,w] (already divided by scaling_factor, plus shift_factor for SD3) -> sample [B,3,H,W] in
[-1, 1].
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import IntegrityError, ManifestError
from .validation import Checks

FORMAT_VERSION = 4
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4)  # what this reader accepts; what each added: see the module doc
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16")
BACKENDS = ("onnx", "tensorrt")  # what an export can hold per UNet: ONNX graphs, optionally TensorRT plans
FILE_KINDS = ("onnx", "onnx_data", "tensorrt", "openvino", "openvino_bin")
OPENVINO_KINDS = ("openvino", "openvino_bin")
GRAPH_KINDS = ("onnx", "onnx_data")  # router, text encoder, VAE decoder: ONNX only (plans and IRs are the UNets')  # an OpenVINO IR: graph (.xml) and weights (.bin), format 4
QUANT_PRECISIONS = ("int8", "int8_weights", "fp32")  # an expert's IR: weights+activations, weights only, none
FAMILIES = ("pixel", "sd", "sdxl", "pixart", "sd3")  # pixel-space (toy) UNets; SD 1.x/2.x latent UNets; SDXL-class
# (text_time); PixArt transformers (T5 text with its padding mask, which the denoiser also reads); SD3 (MMDiT:
# CLIP-L + CLIP-G + T5 context, the CLIPs' pooled projection as pooled_projections, flow matching)
UNCOND_KINDS = ("empty_prompt", "zeros")  # the text condition of "", or zeros (SDXL's force_zeros_for_empty_prompt)

# Graph interface (format version 1)
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
UNET_ADDED_INPUTS = ("text_embeds", "time_ids")  # SDXL-class UNets (addition_embed_type "text_time"), format 3
UNET_MASK_INPUT = "encoder_attention_mask"  # PixArt: the caption's padding mask [N, L] int64 (1 = real token)
UNET_POOLED_INPUT = "pooled_projections"  # SD3: the pooled text embedding [N, P] (text_embeds of its text graph)
UNET_OUTPUTS = ("out_sample",)
TEXT_ENCODER_INPUTS = ("input_ids", "attention_mask")
TEXT_ENCODER_OUTPUTS = ("last_hidden_state",)
TEXT_ENCODER_INPUT_2 = "input_ids_2"  # SDXL, SD3: the second tokenizer's ids
TEXT_ENCODER_INPUT_3 = "input_ids_3"  # SD3: the T5 tokenizer's ids
TOKENIZER_IDS = {"json": TEXT_ENCODER_INPUTS[0], "json_2": TEXT_ENCODER_INPUT_2, "json_3": TEXT_ENCODER_INPUT_3}
TEXT_ENCODER_POOLED = "text_embeds"  # SDXL: the second encoder's pooled, projected embedding; SD3: both CLIPs'
ROUTER_INPUTS = ("input_ids", "attention_mask")
ROUTER_OUTPUTS = ("scores", "embedding")
VAE_DECODER_INPUTS = ("latent_sample",)
VAE_DECODER_OUTPUTS = ("sample",)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _checks(source: str) -> Checks:
    """Typed readers naming `source` and the key on error (ManifestError)."""
    return Checks(ManifestError, f"{source}: ")


# -- the dataclasses -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FileRef:
    """One file of the export: relative POSIX path, sha256 hex digest, size in bytes."""

    path: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, root: str | os.PathLike, relpath: str) -> FileRef:
        """Hash an existing file under `root` (used by the exporter)."""
        p = Path(root) / relpath
        return cls(path=PurePosixPath(relpath).as_posix(), sha256=sha256_file(p), bytes=p.stat().st_size)

    @classmethod
    def _read(cls, r: Checks, value, where: str) -> FileRef:
        d = r.obj(value, where, ("path", "sha256", "bytes"))
        path = r.string(d["path"], f"{where}.path")
        pp = PurePosixPath(path)
        if pp.is_absolute() or ".." in pp.parts or "\\" in path:
            r.fail(f"{where}.path", f"{path!r} must be a relative path inside the export directory")
        digest = r.string(d["sha256"], f"{where}.sha256")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            r.fail(f"{where}.sha256", f"{digest!r} is not a lowercase hex sha256")
        return cls(path=path, sha256=digest, bytes=r.integer(d["bytes"], f"{where}.bytes", lo=0))


def _read_files(r: Checks, value, where: str, required: tuple[str, ...] = ("onnx",),
                allowed: tuple[str, ...] = FILE_KINDS) -> dict[str, FileRef]:
    d = r.obj(value, where, required, tuple(k for k in allowed if k not in required))
    return {k: FileRef._read(r, v, f"{where}.{k}") for k, v in d.items()}


@dataclass(frozen=True)
class SchedulerInfo:
    name: str  # "ddim" | "pndm" | "euler" | "flow_euler"
    config: dict[str, Any]
    mu: float | None = None  # flow_euler with use_dynamic_shifting: set_timesteps' mu at the export's size


@dataclass(frozen=True)
class RouterInfo:
    files: dict[str, FileRef]
    max_length: int  # token length the router's prompt encoder was trained with
    num_experts: int
    embedding_dim: int
    codes: FileRef | None = None  # the architecture codes, for provenance (the graph has what it needs)


@dataclass(frozen=True)
class TextEncoderInfo:
    files: dict[str, FileRef]
    hidden_size: int
    pooled_dim: int | None = None  # SDXL, SD3: width of the pooled output text_embeds
    uncond: str = "empty_prompt"  # UNCOND_KINDS


@dataclass(frozen=True)
class AddedCondInfo:
    """SDXL-class UNets: width of text_embeds, and the image size the runtime's time_ids are built from
    ((h, w) original size, (0, 0) crop, (h, w) target size)."""

    text_embeds_dim: int
    image_size: tuple[int, int]

    def time_ids(self) -> list[float]:
        h, w = self.image_size
        return [float(h), float(w), 0.0, 0.0, float(h), float(w)]


@dataclass(frozen=True)
class VaeDecoderInfo:
    files: dict[str, FileRef]
    scaling_factor: float
    shift_factor: float = 0.0  # SD3: the decoder reads latents / scaling_factor + shift_factor


@dataclass(frozen=True)
class TokenizerInfo:
    """{"json": the text encoder's tokenizer.json, "json_2": the second text encoder's (SDXL, SD3), "json_3": the
    third's (SD3's T5), "router_json": the router's, when it differs}; `lengths`: the tokens each text tokenizer
    pads and truncates to, when not all `text_len` (SD3: CLIP 77 and T5 256 make a context of 333)."""

    files: dict[str, FileRef]
    lengths: dict[str, int] | None = None

    @property
    def router_file(self) -> FileRef:
        return self.files.get("router_json", self.files["json"])


@dataclass(frozen=True)
class ExpertInfo:
    id: int
    macs: float  # MACs of one UNet call, batch 1, at sample_size
    macs_fraction: float  # macs / dense_macs
    params: int
    share: float  # fraction of training prompts the router sent to this expert
    files: dict[str, FileRef]
    quantization: dict[str, Any] | None = None  # aptp quantize's choice for this expert (format 4)

    @property
    def precision(self) -> str:
        """"int8" / "int8_weights" when the expert has an OpenVINO IR of that precision, else "fp32"."""
        return (self.quantization or {}).get("precision", "fp32") if "openvino" in self.files else "fp32"


@dataclass(frozen=True)
class DenseInfo:
    macs: float
    params: int
    files: dict[str, FileRef]


@dataclass(frozen=True)
class TensorRTInfo:
    """Where an export's TensorRT plans were built: TensorRT version, GPU name, compute capability
    ("major.minor"), and whether fp32 layers were allowed TF32 (never, since format version 2)."""

    version: str
    gpu: str
    compute_capability: str
    tf32: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 7.5  # diffusers' StableDiffusionPipeline default; an export without `sampling` uses these


@dataclass(frozen=True)
class SamplingInfo:
    """The sampling settings an export recommends: denoising steps and classifier-free guidance scale (its
    scheduler is `Manifest.scheduler.name`)."""

    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE


@dataclass(frozen=True)
class OpenVINOInfo:
    """What wrote an export's OpenVINO IR files: the openvino and nncf versions."""

    version: str
    nncf: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Manifest:
    base_model: str
    precision: str
    scheduler: SchedulerInfo
    budget: float | None
    dense_macs: float
    text_len: int
    sample_size: tuple[int, int]
    in_channels: int
    latent: bool
    router: RouterInfo
    text_encoder: TextEncoderInfo
    tokenizer: TokenizerInfo
    experts: list[ExpertInfo]
    vae_decoder: VaeDecoderInfo | None = None
    dense: DenseInfo | None = None
    tensorrt: TensorRTInfo | None = None
    openvino: OpenVINOInfo | None = None
    sampling: SamplingInfo | None = None
    family: str = "pixel"
    added_cond: AddedCondInfo | None = None
    created_by: str = "aptp"
    info: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, source: str = MANIFEST_NAME) -> Manifest:
        """Validate and build; raises ManifestError naming `source` and the offending key."""
        r = _checks(source)
        if not isinstance(d, dict):
            r.fail("top level", "expected a JSON object")
        version = d.get("format_version")
        if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
            raise ManifestError(
                f"{source}: format_version {version!r} is not supported by this runtime "
                f"(it reads format_version {', '.join(map(str, READABLE_FORMAT_VERSIONS))}); "
                "re-export with a matching aptp version"
            )
        required = ("format_version", "base_model", "precision", "scheduler", "budget", "dense_macs",
                    "text_len", "sample_size", "in_channels", "latent", "router", "text_encoder",
                    "tokenizer", "experts")
        optional = ("vae_decoder", "dense", "created_by", "info") + (("tensorrt",) if version >= 2 else ()) \
            + (("family", "added_cond") if version >= 3 else ()) + (("openvino", "sampling") if version >= 4 else ())
        r.obj(d, "top level", required, optional)

        scheduler = _read_scheduler(r, d["scheduler"])
        size = d["sample_size"]
        if not (isinstance(size, list) and len(size) == 2):
            r.fail("sample_size", f"expected [height, width], got {size!r}")
        sample_size = (r.integer(size[0], "sample_size[0]", lo=1), r.integer(size[1], "sample_size[1]", lo=1))
        router = _read_router(r, d["router"])
        text_encoder, tokenizer = _read_text(r, d, version)
        latent = r.boolean(d["latent"], "latent")
        vae, family, added = _read_family(r, d, latent, text_encoder, tokenizer)
        _check_sd3_keys(r, family, scheduler, vae, tokenizer, r.integer(d["text_len"], "text_len", lo=2))
        kinds = FILE_KINDS if version >= 4 else tuple(k for k in FILE_KINDS if k not in OPENVINO_KINDS)
        experts = _read_experts(r, d["experts"], router, kinds, version)
        dense = None
        if d.get("dense") is not None:
            dn = r.obj(d["dense"], "dense", ("macs", "params", "files"))
            dense = DenseInfo(r.number(dn["macs"], "dense.macs", lo=0), r.integer(dn["params"], "dense.params", lo=0),
                              _read_files(r, dn["files"], "dense.files", allowed=kinds))
        info = d.get("info", {})
        if not isinstance(info, dict):
            r.fail("info", "expected an object")
        tensorrt = None if d.get("tensorrt") is None else _read_tensorrt(r, d["tensorrt"])
        has_plans = any("tensorrt" in e.files for e in experts) or (dense is not None and "tensorrt" in dense.files)
        if version >= 2 and has_plans and tensorrt is None:
            r.fail("tensorrt", "TensorRT plans are listed but not where they were built "
                               "(version, gpu, compute_capability)")
        openvino = None
        if d.get("openvino") is not None:
            o = r.obj(d["openvino"], "openvino", ("version", "nncf"))
            openvino = OpenVINOInfo(r.string(o["version"], "openvino.version"), r.string(o["nncf"], "openvino.nncf"))
        sampling = None
        if d.get("sampling") is not None:
            sm = r.obj(d["sampling"], "sampling", ("steps", "guidance_scale"))
            sampling = SamplingInfo(r.integer(sm["steps"], "sampling.steps", lo=1),
                                    r.number(sm["guidance_scale"], "sampling.guidance_scale", lo=0, hi=100))
        parts = [e.files for e in experts] + ([dense.files] if dense is not None else [])
        for files, where in zip(parts, [f"experts[{e.id}]" for e in experts] + ["dense"]):
            if ("openvino" in files) != ("openvino_bin" in files):
                r.fail(f"{where}.files", "an OpenVINO IR needs both openvino (.xml) and openvino_bin (.bin)")
        if any("openvino" in f for f in parts) and openvino is None:
            r.fail("openvino", "OpenVINO IR files are listed but not what wrote them (version, nncf)")

        manifest = cls(
            base_model=r.string(d["base_model"], "base_model"),
            precision=r.string(d["precision"], "precision", PRECISIONS),
            scheduler=scheduler,
            budget=r.number(d["budget"], "budget", lo=0, hi=1, optional=True),
            dense_macs=r.number(d["dense_macs"], "dense_macs", lo=0),
            text_len=r.integer(d["text_len"], "text_len", lo=2),
            sample_size=sample_size,
            in_channels=r.integer(d["in_channels"], "in_channels", lo=1),
            latent=latent,
            router=router,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            experts=experts,
            vae_decoder=vae,
            dense=dense,
            tensorrt=tensorrt,
            openvino=openvino,
            sampling=sampling,
            family=family,
            added_cond=added,
            created_by=r.string(d.get("created_by", "aptp"), "created_by"),
            info=info,
            format_version=version,
        )
        paths = [f.path for f in manifest.all_files()]
        dup = sorted({p for p in paths if paths.count(p) > 1})
        if dup:
            r.fail("files", f"{dup[0]!r} is listed twice")
        return manifest

    # -- writing ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the documented key order (read back by `from_dict`)."""
        d = asdict(self)
        d["sample_size"] = list(self.sample_size)
        if d["added_cond"] is not None:
            d["added_cond"]["image_size"] = list(self.added_cond.image_size)
        if d["text_encoder"]["pooled_dim"] is None:
            del d["text_encoder"]["pooled_dim"]
        for part, key, default in (("scheduler", "mu", None), ("vae_decoder", "shift_factor", 0.0),
                                   ("tokenizer", "lengths", None)):  # sd3's keys, absent from other exports
            if d[part] is not None and d[part][key] == default:
                del d[part][key]
        order = ["format_version", "base_model", "created_by", "family", "precision", "scheduler", "sampling", "budget",
                 "dense_macs", "text_len", "sample_size", "in_channels", "latent", "router", "text_encoder",
                 "added_cond", "vae_decoder", "tokenizer", "experts", "dense", "tensorrt", "openvino", "info"]
        for e in d["experts"]:
            if e.get("quantization") is None:
                e.pop("quantization", None)
        if self.format_version < 4:
            order.remove("openvino")
            order.remove("sampling")
        if self.format_version < 3:  # an older manifest read and written back keeps its keys
            order = [k for k in order if k not in ("family", "added_cond")]
            for k in ("pooled_dim", "uncond"):
                d["text_encoder"].pop(k, None)
        if self.format_version < 2:
            order.remove("tensorrt")
        return {k: d[k] for k in order}

    # -- queries ---------------------------------------------------------------------------------
    @property
    def sampling_defaults(self) -> SamplingInfo:
        """The recorded sampling settings, or the defaults (25 steps, guidance 7.5) of an export without them."""
        return self.sampling or SamplingInfo()

    def all_files(self) -> list[FileRef]:
        """Every file the manifest lists, each once, in a stable order."""
        groups = [self.router.files, self.text_encoder.files, self.tokenizer.files]
        if self.vae_decoder is not None:
            groups.append(self.vae_decoder.files)
        groups += [e.files for e in self.experts]
        if self.dense is not None:
            groups.append(self.dense.files)
        out = [f for g in groups for f in g.values()]
        if self.router.codes is not None:
            out.append(self.router.codes)
        return out

    def expert(self, expert_id: int) -> ExpertInfo:
        if not 0 <= expert_id < len(self.experts):
            raise ManifestError(f"no expert {expert_id} (the manifest lists {len(self.experts)})")
        return self.experts[expert_id]


# -- reading the parts of a manifest (Manifest.from_dict) -------------------------------------------
def _read_scheduler(r: Checks, value) -> SchedulerInfo:
    sch = r.obj(value, "scheduler", ("name", "config"), ("mu",))
    if not isinstance(sch["config"], dict):
        r.fail("scheduler.config", "expected an object")
    mu = sch.get("mu")
    return SchedulerInfo(r.string(sch["name"], "scheduler.name"), dict(sch["config"]),
                         None if mu is None else r.number(mu, "scheduler.mu"))


def _read_router(r: Checks, value) -> RouterInfo:
    rt = r.obj(value, "router", ("files", "max_length", "num_experts", "embedding_dim"), ("codes",))
    return RouterInfo(
        files=_read_files(r, rt["files"], "router.files", allowed=GRAPH_KINDS),
        max_length=r.integer(rt["max_length"], "router.max_length", lo=2),
        num_experts=r.integer(rt["num_experts"], "router.num_experts", lo=1),
        embedding_dim=r.integer(rt["embedding_dim"], "router.embedding_dim", lo=1),
        codes=None if rt.get("codes") is None else FileRef._read(r, rt["codes"], "router.codes"),
    )


def _read_text(r: Checks, d: dict, version: int) -> tuple[TextEncoderInfo, TokenizerInfo]:
    te = r.obj(d["text_encoder"], "text_encoder", ("files", "hidden_size"),
               ("pooled_dim", "uncond") if version >= 3 else ())
    text_encoder = TextEncoderInfo(
        _read_files(r, te["files"], "text_encoder.files", allowed=GRAPH_KINDS),
        r.integer(te["hidden_size"], "text_encoder.hidden_size", lo=1),
        None if te.get("pooled_dim") is None else r.integer(te["pooled_dim"], "text_encoder.pooled_dim", lo=1),
        r.string(te.get("uncond", "empty_prompt"), "text_encoder.uncond", UNCOND_KINDS))
    tk = r.obj(d["tokenizer"], "tokenizer", ("files",), ("lengths",) if version >= 3 else ())
    files = _read_files(r, tk["files"], "tokenizer.files", required=("json",),
                        allowed=("json", "json_2", "json_3", "router_json") if version >= 3 else ("json", "router_json"))
    lengths = None
    if tk.get("lengths") is not None:
        raw = r.obj(tk["lengths"], "tokenizer.lengths", (), tuple(TOKENIZER_IDS))
        lengths = {k: r.integer(v, f"tokenizer.lengths.{k}", lo=1) for k, v in raw.items()}
        for k in lengths:
            if k not in files:
                r.fail(f"tokenizer.lengths.{k}", f"no tokenizer file {k!r} is listed")
    return text_encoder, TokenizerInfo(files, lengths)


def _read_family(r: Checks, d: dict, latent: bool, text_encoder: TextEncoderInfo,
                 tokenizer: TokenizerInfo) -> tuple[VaeDecoderInfo | None, str, AddedCondInfo | None]:
    """(VAE decoder, family, SDXL extra inputs), checked against each other and the text parts."""
    vae = None
    if d.get("vae_decoder") is not None:
        v = r.obj(d["vae_decoder"], "vae_decoder", ("files", "scaling_factor"), ("shift_factor",))
        vae = VaeDecoderInfo(_read_files(r, v["files"], "vae_decoder.files", allowed=GRAPH_KINDS),
                             r.number(v["scaling_factor"], "vae_decoder.scaling_factor", lo=1e-12),
                             r.number(v.get("shift_factor", 0.0), "vae_decoder.shift_factor"))
    if latent and vae is None:
        r.fail("vae_decoder", "a latent model needs a vae_decoder")
    if not latent and vae is not None:
        r.fail("vae_decoder", "a pixel-space model (latent: false) has no vae_decoder")
    family = r.string(d["family"], "family", FAMILIES) if "family" in d else ("sd" if latent else "pixel")
    added = None
    if d.get("added_cond") is not None:
        a = r.obj(d["added_cond"], "added_cond", ("text_embeds_dim", "image_size"))
        isz = a["image_size"]
        if not (isinstance(isz, list) and len(isz) == 2):
            r.fail("added_cond.image_size", f"expected [height, width], got {isz!r}")
        added = AddedCondInfo(r.integer(a["text_embeds_dim"], "added_cond.text_embeds_dim", lo=1),
                              (r.integer(isz[0], "added_cond.image_size[0]", lo=1),
                               r.integer(isz[1], "added_cond.image_size[1]", lo=1)))
    if (family == "sdxl") != (added is not None):
        r.fail("added_cond", "an sdxl export needs added_cond, and only an sdxl export has it")
    if (family == "pixel") == latent:
        r.fail("family", f"{family!r} but latent is {str(latent).lower()} (pixel-space models are not latent, "
                         "sd, sdxl, pixart and sd3 ones are)")
    if family in ("sdxl", "sd3") and "json_2" not in tokenizer.files:
        r.fail("tokenizer.files", f"an {family} export needs json_2, the second text encoder's tokenizer")
    if family == "sd3" and text_encoder.pooled_dim is None:
        r.fail("text_encoder.pooled_dim", "an sd3 export's text encoder gives the pooled projection text_embeds")
    if added is not None and text_encoder.pooled_dim != added.text_embeds_dim:
        r.fail("text_encoder.pooled_dim", f"{text_encoder.pooled_dim} but the UNet reads text_embeds of "
                                          f"{added.text_embeds_dim}")
    return vae, family, added


def _check_sd3_keys(r: Checks, family: str, scheduler: SchedulerInfo, vae: VaeDecoderInfo | None,
                    tokenizer: TokenizerInfo, text_len: int) -> None:
    """SD3's keys appear in sd3 exports only, and its token lengths add up: both CLIP tokenizers pad to the same
    length (their states are joined feature-wise), T5's fills the rest of the context (exactly, with json_3;
    without T5 the graph's zeros do)."""
    if family != "sd3":
        for where, present in (("tokenizer.files.json_3", "json_3" in tokenizer.files),
                               ("tokenizer.lengths", tokenizer.lengths is not None),
                               ("scheduler.mu", scheduler.mu is not None),
                               ("vae_decoder.shift_factor", vae is not None and vae.shift_factor != 0.0)):
            if present:
                r.fail(where, f"belongs to sd3 exports, not to a {family!r} one")
        return
    try:
        sd3_token_lengths(tokenizer.lengths, "json_3" in tokenizer.files, text_len)
    except ValueError as e:
        r.fail("tokenizer.lengths", str(e))


def sd3_token_lengths(lengths: dict[str, int] | None, has_t5: bool, text_len: int) -> tuple[int, int]:
    """(CLIP tokens, T5 tokens) of an SD3 export's tokenizer lengths, checked (ValueError naming the rule): both
    CLIP tokenizers pad to one length (json, json_2), T5's (json_3, given exactly when there is a T5 tokenizer)
    fills the rest of the context's text_len; without T5 the text graph's zeros fill it."""
    lengths = lengths or {}
    if "json" not in lengths or lengths.get("json_2") != lengths["json"]:
        raise ValueError(f"an sd3 export gives json and json_2 the same length (both CLIPs), got {lengths}")
    if ("json_3" in lengths) != has_t5:
        raise ValueError("json_3 has a length exactly when its tokenizer file is listed")
    clip = int(lengths["json"])
    t5 = int(lengths.get("json_3", text_len - clip))
    if t5 < 1 or clip + t5 != text_len:
        raise ValueError(f"{clip} CLIP + {t5} T5 tokens do not make text_len {text_len}")
    return clip, t5


def _read_quantization(r: Checks, value, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        r.fail(where, "expected an object")
    r.string(value.get("precision"), f"{where}.precision", QUANT_PRECISIONS)
    return dict(value)


def _read_experts(r: Checks, value, router: RouterInfo, kinds: tuple[str, ...] = FILE_KINDS,
                  version: int = FORMAT_VERSION) -> list[ExpertInfo]:
    if not isinstance(value, list) or not value:
        r.fail("experts", "expected a non-empty list")
    experts = []
    for i, e in enumerate(value):
        w = f"experts[{i}]"
        e = r.obj(e, w, ("id", "macs", "macs_fraction", "params", "share", "files"),
                  ("quantization",) if version >= 4 else ())
        experts.append(ExpertInfo(
            id=r.integer(e["id"], f"{w}.id", lo=0),
            macs=r.number(e["macs"], f"{w}.macs", lo=0),
            macs_fraction=r.number(e["macs_fraction"], f"{w}.macs_fraction", lo=0),
            params=r.integer(e["params"], f"{w}.params", lo=0),
            share=r.number(e["share"], f"{w}.share", lo=0, hi=1),
            files=_read_files(r, e["files"], f"{w}.files", allowed=kinds),
            quantization=_read_quantization(r, e.get("quantization"), f"{w}.quantization"),
        ))
    ids = [e.id for e in experts]
    if ids != list(range(len(experts))):
        r.fail("experts", f"ids must be 0..{len(experts) - 1} in order, got {ids}")
    if router.num_experts != len(experts):
        r.fail("router.num_experts", f"{router.num_experts} but {len(experts)} experts are listed")
    return experts


def _read_tensorrt(r: Checks, value) -> TensorRTInfo:
    t = r.obj(value, "tensorrt", ("version", "gpu", "compute_capability"), ("tf32",))
    cc = r.string(t["compute_capability"], "tensorrt.compute_capability")
    if not all(part.isdigit() for part in cc.split(".")) or cc.count(".") != 1:
        r.fail("tensorrt.compute_capability", f"{cc!r} is not of the form major.minor")
    return TensorRTInfo(r.string(t["version"], "tensorrt.version"), r.string(t["gpu"], "tensorrt.gpu"),
                        cc, r.boolean(t.get("tf32", False), "tensorrt.tf32"))


def read_manifest(export_dir: str | os.PathLike) -> Manifest:
    """Read and validate `export_dir/manifest.json` (files are not hashed here; see `verify_files`)."""
    path = Path(export_dir) / MANIFEST_NAME
    if not Path(export_dir).is_dir():
        raise ManifestError(f"{export_dir}: not a directory (expected an export directory with {MANIFEST_NAME})")
    if not path.is_file():
        raise ManifestError(f"{path}: not found (is this an `aptp export` output directory?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    return Manifest.from_dict(data, source=str(path))


def verify_file(export_dir: str | os.PathLike, ref: FileRef) -> None:
    """Raise IntegrityError naming the file if it is missing, of the wrong size or wrong sha256."""
    path = Path(export_dir) / ref.path
    if not path.is_file():
        raise IntegrityError(f"{path}: missing (listed in {MANIFEST_NAME})")
    size = path.stat().st_size
    if size != ref.bytes:
        what = "truncated" if size < ref.bytes else "larger than recorded"
        raise IntegrityError(f"{path}: {what}: {size} bytes, {MANIFEST_NAME} records {ref.bytes}")
    digest = sha256_file(path)
    if digest != ref.sha256:
        raise IntegrityError(
            f"{path}: sha256 {digest[:16]}... does not match {MANIFEST_NAME} ({ref.sha256[:16]}...): "
            "the file is corrupted or was replaced"
        )


def verify_files(export_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Check every listed file (existence, size, sha256); the first bad one raises IntegrityError."""
    for ref in manifest.all_files():
        verify_file(export_dir, ref)
