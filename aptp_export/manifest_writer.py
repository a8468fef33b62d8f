"""Write an export directory the runtime (`engines`) reads: graphs, tokenizer, manifest.json.

`write_export_dir` takes torch modules already in memory (the experts, the text encoder, the
router's encoder and head, optionally the dense UNet and a VAE) and does the whole export:

    out/
      manifest.json                       # written last: a directory without it is not an export
      router.onnx  text_encoder.onnx  [vae_decoder.onnx]  [router_codes.json]
      tokenizer/tokenizer.json  [tokenizer_2/tokenizer.json]   # the second: SDXL's second text encoder
      experts/expert_00.onnx [.plan]  ...  [dense.onnx]
      specs.json                          # the ExportSpec of every graph (for engine rebuilds)

With the TensorRT backend the manifest records where the plans were built (TensorRT version, GPU,
compute capability); the builder's timing cache lives in a temporary directory for the export, so
nothing unlisted is left in the shipped directory.

The manifest format belongs to `engines.manifest` (this module only fills its dataclasses, and
validates the result by reading it back). `aptp export --run` loads a training run into these
arguments; tests call it with tiny random models.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tqdm import tqdm

from engines.backends.cuda import plan_environment
from engines.errors import UserError
from engines.fileio import atomic_path, write_json
from engines.manifest import (
    MANIFEST_NAME,
    UNCOND_KINDS,
    AddedCondInfo,
    DenseInfo,
    ExpertInfo,
    FileRef,
    Manifest,
    RouterInfo,
    SchedulerInfo,
    TensorRTInfo,
    TextEncoderInfo,
    TokenizerInfo,
    VaeDecoderInfo,
)
from engines.schedulers import make_scheduler, scheduler_name

from .export_options import ExportOptions
from .export_spec import (
    ExportSpec,
    router_spec,
    text_encoder_spec,
    unet_batch_range,
    unet_spec,
    vae_decoder_spec,
)
from .onnx_export import (
    DualTextEncoderGraph,
    RouterGraph,
    TextEncoderGraph,
    UNetGraph,
    VaeDecoderGraph,
    export_onnx,
)
from .tensorrt_build import build_engine, import_tensorrt
from .unet_configs import added_cond_dims

PAD_CANDIDATES = ("[PAD]", "<pad>", "<|endoftext|>")


@dataclass
class ExpertModel:
    """One UNet to export with its accounting: MACs per call (batch 1, at sample_size), parameter
    count (counted from the module when None) and `share` of training prompts routed to it."""

    unet: Any
    macs: float
    params: int | None = None
    share: float = 0.0


def _aptp_version() -> str:
    try:
        return f"aptp {version('aptp')}"
    except PackageNotFoundError:
        return "aptp"


def copy_tokenizer(src: str | os.PathLike, out_dir: str | os.PathLike, pad_token: str | None = None,
                   rel: str = "tokenizer/tokenizer.json") -> str:
    """Copy a `tokenizers` tokenizer.json (a file, or a model dir containing one) to out_dir/`rel`
    with its padding token set (give `pad_token` when the model pads with a token that is not in the
    file's padding section or named [PAD]/<pad>, e.g. "!" for SD 2's CLIP); returns `rel`."""

    src = Path(src)
    if src.is_dir():
        src = src / "tokenizer.json"
    if not src.is_file():
        raise UserError(f"{src}: no tokenizer.json (the runtime needs a fast-tokenizer file)")
    tok = Tokenizer.from_file(str(src))
    padding = tok.padding or {}
    if pad_token is None:
        pad_token = padding.get("pad_token")
        if pad_token is None or tok.token_to_id(pad_token) is None:
            pad_token = next((c for c in PAD_CANDIDATES if tok.token_to_id(c) is not None), None)
    if pad_token is None or tok.token_to_id(pad_token) is None:
        raise UserError(f"{src}: cannot find a padding token; pass pad_token=")
    tok.enable_padding(pad_id=tok.token_to_id(pad_token), pad_token=pad_token)
    with atomic_path(Path(out_dir) / rel) as tmp:
        tok.save(str(tmp))
    return rel


def _refs(out_dir: Path, files: dict[str, Path]) -> dict[str, FileRef]:
    return {k: FileRef.of(out_dir, Path(p).relative_to(out_dir).as_posix()) for k, p in files.items()}


def _count_params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _publish_modes(out_dir: Path) -> None:
    """Files written through a temporary file are created 0600; an export directory is meant to be
    shipped and read by another user (a serving container), so give every file the usual mode."""
    mask = os.umask(0)
    os.umask(mask)
    for p in out_dir.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)
        elif p.is_dir():
            os.chmod(p, 0o777 & ~mask)


def write_manifest(out_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Validate `manifest` by a round trip through the reader, then write it atomically."""
    data = manifest.to_dict()
    Manifest.from_dict(json.loads(json.dumps(data)), source="manifest being written")
    path = Path(out_dir) / MANIFEST_NAME
    write_json(path, data)
    return path


def vae_precision(vae, precision: str, sdxl: bool) -> str:
    """The VAE decoder's graph precision. For SDXL exports fp32 when the VAE's config asks to be upcast
    (`force_upcast`, true for SDXL's VAE, whose fp16 decoder overflows to inf/NaN on real latents), as
    diffusers' SDXL pipelines do; otherwise (the fp16-fix SDXL VAE, SD 1.x / 2.x, whose pipeline decodes in
    fp16) the export's precision."""
    config = getattr(vae, "config", None) or {}
    return "fp32" if sdxl and precision == "fp16" and config.get("force_upcast", True) else precision


def _export_graphs(jobs, precision, exporter, backend, options, timing_cache: Path, files, specs, report,
                   vae_prec: str = "fp32") -> None:
    """Export (and with the TensorRT backend, build) every graph of `jobs`, filling files/specs/report."""
    for key, module, spec, path in tqdm(jobs, desc="export", disable=not options.progress):
        # the router and text encoder stay fp32: small, and their outputs feed argmax / every step
        prec = precision if key.startswith(("expert", "dense")) else vae_prec if key == "vae_decoder" else "fp32"
        res = export_onnx(module, spec, path, precision=prec, exporter=exporter)
        files[key] = dict(res.files)
        specs[key] = spec.to_dict()
        report["graphs"][key] = {"seconds": round(res.seconds, 2), "precision": prec,
                                 "max_rel_error": res.max_rel_error, "verified": res.verified,
                                 **({"note": res.note} if res.note else {})}
        if backend == "tensorrt" and key.startswith(("expert", "dense")):
            plan = path.with_suffix(".plan")
            b = build_engine(path, spec, plan, timing_cache=timing_cache, allow_tf32=False)
            files[key]["tensorrt"] = plan
            report["graphs"][key]["tensorrt_seconds"] = round(b.seconds, 2)


def write_export_dir(
    out_dir: str | os.PathLike,
    *,
    experts: list[ExpertModel],
    text_encoder,
    router_encoder,
    router_head,
    tokenizer: str | os.PathLike,
    scheduler_config: dict,
    sample_size: tuple[int, int],
    in_channels: int,
    text_len: int,
    context_dim: int,
    router_max_length: int,
    embedding_dim: int,
    dense_macs: float,
    budget: float | None = None,
    base_model: str = "unet",
    vae=None,
    vae_scaling_factor: float | None = None,
    dense: ExpertModel | None = None,
    codes: dict | None = None,
    size_range: tuple[int, int] | None = None,
    pad_token: str | None = None,
    router_tokenizer: str | os.PathLike | None = None,
    router_pad_token: str | None = None,
    text_encoder_uses_mask: bool = True,
    text_encoder_2=None,
    tokenizer_2: str | os.PathLike | None = None,
    pad_token_2: str | None = None,
    uncond: str = "empty_prompt",
    image_size: tuple[int, int] | None = None,
    info: dict | None = None,
    options: ExportOptions = ExportOptions(),
) -> tuple[Manifest, dict]:
    """Export every model and write manifest.json; returns (manifest, report).

    Args (shapes for batch 1 unless said): experts / dense: UNets with their MACs and shares;
    text_encoder: transformers-style encoder giving the UNet context [B, text_len, context_dim];
    router_encoder + router_head: prompt encoder (mean-pooled, L2-normalised, embedding_dim) and the
    head mapping embeddings to K expert scores; tokenizer: the text encoder's tokenizer.json or its
    directory (pad_token overrides its padding token); router_tokenizer / router_pad_token: the
    router encoder's, when it is another model (default: the same file); text_encoder_uses_mask:
    False for encoders their pipeline calls without an attention mask (SD's CLIP);
    text_encoder_2 / tokenizer_2 / pad_token_2: SDXL's second text encoder (CLIPTextModelWithProjection) and
    its tokenizer; with them the text encoder graph is `DualTextEncoderGraph` and `context_dim` is the
    concatenated width; uncond: "empty_prompt" or "zeros" (SDXL's force_zeros_for_empty_prompt);
    image_size: pixels (h, w) of the images, from which the runtime builds SDXL's time_ids (default:
    sample_size times the VAE factor); scheduler_config: diffusers scheduler config dict; sample_size / in_channels: UNet input (latent
    if `vae` is given); size_range: (min, max) UNet height/width for the dynamic axes (default:
    sample_size only); options: backend, precision, default sampler, profile batch (ExportOptions;
    with_dense and round_to are the caller's: pass `dense` and rounded experts).
    The report holds per-graph seconds and measured relative errors vs torch.
    """

    out_dir = Path(out_dir)
    backend, precision, exporter, max_batch = options.backend, options.precision, options.exporter, options.max_batch
    if not experts:
        raise UserError("no experts to export")
    if (vae is None) != (vae_scaling_factor is None):
        raise UserError("a VAE needs its scaling factor (and a scaling factor needs a VAE)")
    if (text_encoder_2 is None) != (tokenizer_2 is None):
        raise UserError("a second text encoder needs its tokenizer (and a second tokenizer its encoder)")
    if uncond not in UNCOND_KINDS:
        raise UserError(f"uncond must be one of {', '.join(UNCOND_KINDS)}, got {uncond!r}")
    added_dims = added_cond_dims(getattr(experts[0].unet, "config", {}) if experts else {})
    if added_dims is not None and text_encoder_2 is None:
        raise UserError("an SDXL-class UNet (addition_embed_type text_time) needs the second text encoder "
                        "that gives its pooled text embedding")
    name = scheduler_name(options.scheduler)
    make_scheduler(name, scheduler_config)  # fail now on a config the runtime could not use
    plan_env = None
    if backend == "tensorrt":
        import_tensorrt()
        plan_env = plan_environment()  # BackendError (a UserError) when no GPU is usable: before any export

    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / MANIFEST_NAME
    if stale.exists():
        stale.unlink()  # a half-rewritten directory must not look like a finished export
    (out_dir / "timing.cache").unlink(missing_ok=True)  # left, unlisted, by aptp < 0.2

    tok_rel = copy_tokenizer(tokenizer, out_dir, pad_token)
    tok_files = {"json": tok_rel}
    if router_tokenizer is not None:
        tok_files["router_json"] = copy_tokenizer(router_tokenizer, out_dir, router_pad_token,
                                                  rel="tokenizer/router/tokenizer.json")
    if tokenizer_2 is not None:
        tok_files["json_2"] = copy_tokenizer(tokenizer_2, out_dir, pad_token_2, rel="tokenizer_2/tokenizer.json")
    vocab = Tokenizer.from_file(str(out_dir / tok_rel)).get_vocab_size()
    vocab_2 = Tokenizer.from_file(str(out_dir / tok_files["json_2"])).get_vocab_size() if tokenizer_2 else None
    router_vocab = Tokenizer.from_file(str(out_dir / tok_files.get("router_json", tok_rel))).get_vocab_size()
    unet0 = experts[0].unet
    n_down = len(getattr(unet0, "config", {}).get("block_out_channels", (0, 0, 0))) - 1
    unet_batch = unet_batch_range(max_batch)

    def spec_for_unet(u) -> ExportSpec:
        out_ch = getattr(u, "config", {}).get("out_channels", in_channels)
        return unet_spec(in_channels, sample_size, text_len, context_dim, batch=unet_batch, out_channels=out_ch,
                         size_range=size_range, size_multiple=2 ** max(n_down, 0),
                         num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
                         text_embeds_dim=added_dims[0] if added_dims else None)

    if text_encoder_2 is not None:
        pooled_dim = int(text_encoder_2.config.projection_dim)
        te_job = (DualTextEncoderGraph(text_encoder, text_encoder_2),
                  text_encoder_spec(text_len, context_dim, vocab, batch=(1, 2, 64), pooled_dim=pooled_dim,
                                    vocab_size_2=vocab_2))
    else:
        pooled_dim = None
        te_job = (TextEncoderGraph(text_encoder, use_attention_mask=text_encoder_uses_mask),
                  text_encoder_spec(text_len, context_dim, vocab, batch=(1, 2, 64)))
    if added_dims is not None and pooled_dim != added_dims[0]:
        raise UserError(f"the UNet reads text_embeds of width {added_dims[0]}, the second text encoder gives "
                        f"{pooled_dim}")

    jobs: list[tuple[str, Any, ExportSpec, Path]] = [
        ("router", RouterGraph(router_encoder, router_head),
         router_spec(router_max_length, router_vocab, len(experts), embedding_dim, batch=(1, 2, 64)),
         out_dir / "router.onnx"),
        ("text_encoder", *te_job, out_dir / "text_encoder.onnx"),
    ]
    up = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    if vae is not None:
        jobs.append(("vae_decoder", VaeDecoderGraph(vae),
                     vae_decoder_spec(in_channels, sample_size, upscale=up, batch=(1, 1, max_batch),
                                      out_channels=vae.config.out_channels),
                     out_dir / "vae_decoder.onnx"))
    for i, e in enumerate(experts):
        jobs.append((f"expert_{i:02d}", UNetGraph(e.unet), spec_for_unet(e.unet), out_dir / "experts" / f"expert_{i:02d}.onnx"))
    if dense is not None:
        jobs.append(("dense", UNetGraph(dense.unet), spec_for_unet(dense.unet), out_dir / "experts" / "dense.onnx"))

    report: dict[str, Any] = {"precision": precision, "exporter": exporter, "graphs": {}}
    files: dict[str, dict[str, Path]] = {}
    specs = {}
    with tempfile.TemporaryDirectory(prefix="aptp_trt_cache_") as cache_dir:
        _export_graphs(jobs, precision, exporter, backend, options, Path(cache_dir) / "timing.cache",
                       files, specs, report, vae_prec=vae_precision(vae, precision, added_dims is not None))
    write_json(out_dir / "specs.json", specs)

    codes_ref = None
    if codes is not None:
        write_json(out_dir / "router_codes.json", codes)
        codes_ref = FileRef.of(out_dir, "router_codes.json")

    expert_infos = []
    for i, e in enumerate(experts):
        params = e.params if e.params is not None else _count_params(e.unet)
        expert_infos.append(ExpertInfo(id=i, macs=float(e.macs), macs_fraction=float(e.macs) / float(dense_macs),
                                       params=int(params), share=float(e.share),
                                       files=_refs(out_dir, files[f"expert_{i:02d}"])))
    dense_info = None
    if dense is not None:
        dense_info = DenseInfo(macs=float(dense.macs),
                               params=int(dense.params if dense.params is not None else _count_params(dense.unet)),
                               files=_refs(out_dir, files["dense"]))
    manifest = Manifest(
        base_model=base_model,
        created_by=_aptp_version(),
        precision=precision,
        scheduler=SchedulerInfo(name, dict(scheduler_config)),
        budget=None if budget is None else float(budget),
        dense_macs=float(dense_macs),
        text_len=int(text_len),
        sample_size=(int(sample_size[0]), int(sample_size[1])),
        in_channels=int(in_channels),
        latent=vae is not None,
        router=RouterInfo(files=_refs(out_dir, files["router"]), max_length=int(router_max_length),
                          num_experts=len(experts), embedding_dim=int(embedding_dim), codes=codes_ref),
        text_encoder=TextEncoderInfo(files=_refs(out_dir, files["text_encoder"]), hidden_size=int(context_dim),
                                     pooled_dim=pooled_dim, uncond=uncond),
        tokenizer=TokenizerInfo(files={k: FileRef.of(out_dir, v) for k, v in tok_files.items()}),
        experts=expert_infos,
        vae_decoder=None if vae is None else VaeDecoderInfo(_refs(out_dir, files["vae_decoder"]),
                                                            float(vae_scaling_factor)),
        dense=dense_info,
        tensorrt=None if plan_env is None else TensorRTInfo(**plan_env, tf32=False),
        family="sdxl" if added_dims else ("sd" if vae is not None else "pixel"),
        added_cond=None if added_dims is None else AddedCondInfo(
            int(added_dims[0]), tuple(int(v) for v in (image_size or (sample_size[0] * up, sample_size[1] * up)))),
        info={**(info or {}), "export": report},
    )
    _publish_modes(out_dir)
    write_manifest(out_dir, manifest)
    _publish_modes(out_dir)
    return manifest, report
