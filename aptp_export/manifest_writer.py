"""Write an export directory the runtime (`engines`) reads: graphs, tokenizer, manifest.json.

`write_export_dir(out, experts, parts, options)` takes torch modules already in memory (the experts, and in
`export_parts.ExportParts` the text encoder(s), the router's encoder and head, optionally the dense UNet and a
VAE) and does the whole export (which graphs, inputs and manifest fields the model family adds is its entry
in families.py's registry):

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
validates the result by reading it back). `aptp export --run` loads a training run into an
`ExportParts` (training/export_run.py); tests fill one with tiny random models.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tqdm import tqdm

from engines.backends.cuda import plan_environment
from engines.errors import UserError
from engines.fileio import atomic_path, write_json
from engines.machine import memory_available
from engines.manifest import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_STEPS,
    MANIFEST_NAME,
    DenseInfo,
    ExpertInfo,
    FileRef,
    Manifest,
    RouterInfo,
    SamplingInfo,
    SchedulerInfo,
    TensorRTInfo,
    TextEncoderInfo,
    TokenizerInfo,
    VaeDecoderInfo,
    sd3_token_lengths,
)
from engines.schedulers import default_sampler, make_scheduler, scheduler_name

from .export_options import ExportOptions
from .export_parts import ExpertModel, ExportParts
from .export_spec import (
    ExportSpec,
    dit_unet_spec,
    router_spec,
    sd3_text_encoder_spec,
    text_encoder_spec,
    unet_batch_range,
    unet_spec,
    vae_decoder_spec,
)
from .families import Family, detect_family
from .onnx_export import (
    DualTextEncoderGraph,
    RouterGraph,
    Sd3TextEncoderGraph,
    TextEncoderGraph,
    UNetGraph,
    VaeDecoderGraph,
    export_onnx,
)
from .tensorrt_build import build_engine, import_tensorrt

PAD_CANDIDATES = ("[PAD]", "<pad>", "<|endoftext|>")


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


EXPORT_PEAK_FACTOR = 2.0  # peak RSS / fp32 weights of a graph's export: 1.8 measured (docs/perf/dit_latency.md)


def memory_warnings(jobs, available: int | None) -> list[str]:
    """One line per graph of `jobs` whose export would likely need more memory than `available` bytes: its
    weights times EXPORT_PEAK_FACTOR (the trace and the ONNX copy of the weights coexist). Real-size T5-XXL (PixArt's
    and SD3's text encoder, 19 GB in fp32) is the one that does not fit a 24 GB machine."""
    if not available:
        return []
    out = []
    for key, module, _, _ in jobs:
        weights = sum(p.numel() * p.element_size() for p in module.parameters()) if hasattr(module, "parameters") else 0
        need = EXPORT_PEAK_FACTOR * weights
        if need > available:
            out.append(f"exporting {key} ({weights / 1e9:.1f} GB of weights) needs about {need / 1e9:.0f} GB of memory, "
                       f"{available / 1e9:.0f} GB are available: the export will likely be killed; use a machine "
                       "with more memory")
    return out


def _export_graphs(jobs, options: ExportOptions, timing_cache: Path, files, specs, report, vae_prec: str) -> None:
    """Export (and with the TensorRT backend, build) every graph of `jobs`, filling files/specs/report."""
    precision, exporter, backend = options.precision, options.exporter, options.backend
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


def write_export_dir(out_dir: str | os.PathLike, experts: list[ExpertModel], parts: ExportParts,
                     options: ExportOptions = ExportOptions()) -> tuple[Manifest, dict]:
    """Export every model and write manifest.json; returns (manifest, report).

    Args: out_dir: the export directory (created; a manifest already there is removed first);
    experts: the UNets with their MACs and shares (ExpertModel); parts: everything else the export holds
    (ExportParts: text encoder(s) and tokenizers, router, VAE, scheduler config, shapes, the dense reference);
    options: backend, precision, default sampler, profile batch and sizes (ExportOptions; with_dense and
    round_to are the caller's: put `dense` in `parts` and pass rounded experts).
    The model family (families.py) is decided once, from the first expert's config and whether there is a VAE.
    The report holds per-graph seconds and measured relative errors vs torch.
    """

    out_dir = Path(out_dir)
    family = _family(experts, parts)
    name = scheduler_name(options.scheduler or default_sampler(parts.scheduler_config))
    mu = _scheduler_mu(name, experts, parts)
    make_scheduler(name, parts.scheduler_config, mu=mu)  # fail now on a config the runtime could not use
    plan_env = None
    if options.backend == "tensorrt":
        import_tensorrt()
        plan_env = plan_environment()  # BackendError (a UserError) when no GPU is usable: before any export

    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / MANIFEST_NAME
    if stale.exists():
        stale.unlink()  # a half-rewritten directory must not look like a finished export
    (out_dir / "timing.cache").unlink(missing_ok=True)  # left, unlisted, by aptp < 0.2

    tok_files = _copy_tokenizers(out_dir, parts)
    jobs = _graph_jobs(out_dir, experts, parts, options, family, tok_files)
    for line in memory_warnings(jobs, memory_available()):
        warnings.warn(line, stacklevel=2)  # a warning, not a refusal: the estimate is rough
    report: dict[str, Any] = {"precision": options.precision, "exporter": options.exporter, "graphs": {}}
    files: dict[str, dict[str, Path]] = {}
    specs = {}
    with tempfile.TemporaryDirectory(prefix="aptp_trt_cache_") as cache_dir:
        _export_graphs(jobs, options, Path(cache_dir) / "timing.cache", files, specs, report,
                       vae_prec=family.vae_precision(parts.vae, options.precision))
    write_json(out_dir / "specs.json", specs)

    codes_ref = None
    if parts.codes is not None:
        write_json(out_dir / "router_codes.json", parts.codes)
        codes_ref = FileRef.of(out_dir, "router_codes.json")
    dense, vae = parts.dense, parts.vae
    manifest = Manifest(
        base_model=parts.base_model,
        created_by=_aptp_version(),
        precision=options.precision,
        scheduler=SchedulerInfo(name, dict(parts.scheduler_config), mu),
        sampling=sampling_info(options, parts.sampling),
        budget=None if parts.budget is None else float(parts.budget),
        dense_macs=float(parts.dense_macs),
        text_len=int(parts.text_len),
        sample_size=(int(parts.sample_size[0]), int(parts.sample_size[1])),
        in_channels=int(parts.in_channels),
        latent=vae is not None,
        router=RouterInfo(files=_refs(out_dir, files["router"]), max_length=int(parts.router_max_length),
                          num_experts=len(experts), embedding_dim=int(parts.embedding_dim), codes=codes_ref),
        text_encoder=TextEncoderInfo(files=_refs(out_dir, files["text_encoder"]), hidden_size=int(parts.context_dim),
                                     pooled_dim=_pooled_dim(parts, family), uncond=parts.uncond),
        tokenizer=TokenizerInfo(files={k: FileRef.of(out_dir, v) for k, v in tok_files.items()},
                                lengths=dict(parts.token_lengths) if parts.token_lengths else None),
        experts=[ExpertInfo(id=i, macs=float(e.macs), macs_fraction=float(e.macs) / float(parts.dense_macs),
                            params=_params(e), share=float(e.share), files=_refs(out_dir, files[f"expert_{i:02d}"]))
                 for i, e in enumerate(experts)],
        vae_decoder=None if vae is None else VaeDecoderInfo(_refs(out_dir, files["vae_decoder"]),
                                                            float(parts.vae_scaling_factor),
                                                            float(parts.vae_shift_factor)),
        dense=None if dense is None else DenseInfo(macs=float(dense.macs), params=_params(dense),
                                                   files=_refs(out_dir, files["dense"])),
        tensorrt=None if plan_env is None else TensorRTInfo(**plan_env, tf32=False),
        family=family.name,
        added_cond=family.added_cond(_unet_config(experts[0]), parts.image_size or _image_size(parts)),
        info={**(parts.info or {}), "export": report},
    )
    _publish_modes(out_dir)
    write_manifest(out_dir, manifest)
    _publish_modes(out_dir)
    return manifest, report


def _unet_config(expert: ExpertModel):
    return getattr(expert.unet, "config", None) or {}


def _params(expert: ExpertModel) -> int:
    return int(expert.params if expert.params is not None else _count_params(expert.unet))


def _pooled_dim(parts: ExportParts, family: Family) -> int | None:
    """Width of the text graph's pooled output text_embeds: the second text encoder's projection (SDXL), both
    CLIPs' (SD3); None without a second encoder."""
    if parts.text_encoder_2 is None:
        return None
    width = int(parts.text_encoder_2.config.projection_dim)
    return width + int(parts.text_encoder.config.projection_dim) if family.text_graph == "sd3" else width


def _scheduler_mu(name: str, experts: list[ExpertModel], parts: ExportParts) -> float | None:
    """The flow sampler's resolution shift mu for the export's fixed latent size, when its config has
    use_dynamic_shifting: calculate_shift of the transformer's image tokens (h / patch) * (w / patch), as
    StableDiffusion3Pipeline computes it; None otherwise."""
    if name != "flow_euler" or not parts.scheduler_config.get("use_dynamic_shifting"):
        return None
    patch = int(_unet_config(experts[0]).get("patch_size") or 1)
    h, w = parts.sample_size
    return float(make_scheduler(name, parts.scheduler_config).calculate_shift((h // patch) * (w // patch)))


def _vae_factor(vae) -> int:
    """How many pixels one latent is per side (1 without a VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


def _image_size(parts: ExportParts) -> tuple[int, int]:
    """Default pixel size of the images: the UNet's sample size times the VAE factor."""
    up = _vae_factor(parts.vae)
    return parts.sample_size[0] * up, parts.sample_size[1] * up


def _family(experts: list[ExpertModel], parts: ExportParts) -> Family:
    """The export's model family, decided once (families.detect_family), and a check that `parts` holds what it
    needs; raises UserError before anything is written."""
    if not experts:
        raise UserError("no experts to export")
    config = _unet_config(experts[0])
    family = detect_family(config, has_vae=parts.vae is not None)
    if family.second_text_encoder and parts.text_encoder_2 is None:
        raise UserError(f"an {family.name.upper()}-class denoiser needs the second text encoder that gives its "
                        "pooled text embedding")
    if not family.second_text_encoder and parts.text_encoder_2 is not None:
        raise UserError(f"a second text encoder was given, but a {family.name!r}-family UNet reads none")
    if family.text_graph != "sd3" and (parts.text_encoder_3 is not None or parts.token_lengths):
        raise UserError(f"a third text encoder and per-tokenizer lengths belong to SD3; a {family.name!r}-family "
                        "denoiser reads one context of text_len tokens")
    if family.text_graph == "sd3":
        _sd3_lengths(parts)
    width = family.pooled_dim(config)
    if width is not None and _pooled_dim(parts, family) != width:
        raise UserError(f"the denoiser reads a pooled text embedding of width {width}, the text encoders give "
                        f"{_pooled_dim(parts, family)}")
    return family


def _sd3_lengths(parts: ExportParts) -> tuple[int, int]:
    """(CLIP tokens, T5 tokens) of an SD3 export: `token_lengths` checked by the reader's rule
    (engines.manifest.sd3_token_lengths) before anything is exported."""
    try:
        return sd3_token_lengths(parts.token_lengths, parts.tokenizer_3 is not None, parts.text_len)
    except ValueError as e:
        raise UserError(f"token_lengths: {e}") from None


def _copy_tokenizers(out_dir: Path, parts: ExportParts) -> dict[str, str]:
    """Copy the text encoder's, the router's (when another) and the second tokenizer; the manifest's
    tokenizer files, relative to `out_dir`."""
    tok_files = {"json": copy_tokenizer(parts.tokenizer, out_dir, parts.pad_token)}
    if parts.router_tokenizer is not None:
        tok_files["router_json"] = copy_tokenizer(parts.router_tokenizer, out_dir, parts.router_pad_token,
                                                  rel="tokenizer/router/tokenizer.json")
    if parts.tokenizer_2 is not None:
        tok_files["json_2"] = copy_tokenizer(parts.tokenizer_2, out_dir, parts.pad_token_2,
                                             rel="tokenizer_2/tokenizer.json")
    if parts.tokenizer_3 is not None:
        tok_files["json_3"] = copy_tokenizer(parts.tokenizer_3, out_dir, rel="tokenizer_3/tokenizer.json")
    return tok_files


def _graph_jobs(out_dir: Path, experts: list[ExpertModel], parts: ExportParts, options: ExportOptions,
                family: Family, tok_files: dict[str, str]) -> list[tuple[str, Any, ExportSpec, Path]]:
    """(key, graph module, spec, path) of every graph to export: router, text encoder, [VAE decoder], experts,
    [dense]."""

    def vocab(key: str) -> int:
        return Tokenizer.from_file(str(out_dir / tok_files[key])).get_vocab_size()

    n_down = len(_unet_config(experts[0]).get("block_out_channels", (0, 0, 0))) - 1
    unet_batch = unet_batch_range(options.max_batch)
    dims = family.added_cond_dims(_unet_config(experts[0]))

    def spec_for_unet(u) -> ExportSpec:
        if family.backbone != "unet":  # a DiT: fixed size (its position table), its own extra inputs
            if options.size_range is not None:
                raise UserError("a diffusion transformer's graph has one latent size (its position table is "
                                "computed from it at trace time): export without --size-range")
            return dit_unet_spec(getattr(u, "config", None) or {}, parts.sample_size, parts.text_len,
                                 batch=unet_batch)
        out_ch = getattr(u, "config", {}).get("out_channels", parts.in_channels)
        return unet_spec(parts.in_channels, parts.sample_size, parts.text_len, parts.context_dim, batch=unet_batch,
                         out_channels=out_ch, size_range=options.size_range, size_multiple=2 ** max(n_down, 0),
                         num_train_timesteps=parts.scheduler_config.get("num_train_timesteps", 1000),
                         text_embeds_dim=dims[0] if dims else None)

    if family.text_graph == "sd3":
        clip_len, t5_len = _sd3_lengths(parts)
        te_graph = Sd3TextEncoderGraph(parts.text_encoder, parts.text_encoder_2, parts.text_encoder_3,
                                       parts.context_dim, t5_len)
        te_spec = sd3_text_encoder_spec(clip_len, t5_len, parts.context_dim, _pooled_dim(parts, family),
                                        (vocab("json"), vocab("json_2"), vocab("json_3") if "json_3" in tok_files
                                         else None))
    elif family.second_text_encoder:
        te_graph = DualTextEncoderGraph(parts.text_encoder, parts.text_encoder_2)
        te_spec = text_encoder_spec(parts.text_len, parts.context_dim, vocab("json"), batch=(1, 2, 64),
                                    pooled_dim=_pooled_dim(parts, family), vocab_size_2=vocab("json_2"))
    else:
        te_graph = TextEncoderGraph(parts.text_encoder, use_attention_mask=parts.text_encoder_uses_mask)
        te_spec = text_encoder_spec(parts.text_len, parts.context_dim, vocab("json"), batch=(1, 2, 64))
    jobs: list[tuple[str, Any, ExportSpec, Path]] = [
        ("router", RouterGraph(parts.router_encoder, parts.router_head),
         router_spec(parts.router_max_length, vocab("router_json" if "router_json" in tok_files else "json"),
                     len(experts), parts.embedding_dim, batch=(1, 2, 64)),
         out_dir / "router.onnx"),
        ("text_encoder", te_graph, te_spec, out_dir / "text_encoder.onnx"),
    ]
    if parts.vae is not None:
        jobs.append(("vae_decoder", VaeDecoderGraph(parts.vae),
                     vae_decoder_spec(parts.in_channels, parts.sample_size, upscale=_vae_factor(parts.vae),
                                      batch=(1, 1, options.max_batch), out_channels=parts.vae.config.out_channels),
                     out_dir / "vae_decoder.onnx"))
    for i, e in enumerate(experts):
        jobs.append((f"expert_{i:02d}", UNetGraph(e.unet), spec_for_unet(e.unet),
                     out_dir / "experts" / f"expert_{i:02d}.onnx"))
    if parts.dense is not None:
        jobs.append(("dense", UNetGraph(parts.dense.unet), spec_for_unet(parts.dense.unet),
                     out_dir / "experts" / "dense.onnx"))
    return jobs


def sampling_info(options, recommended: dict | None) -> SamplingInfo:
    """The manifest's sampling defaults: the export flags, else the model's sampling.json, else 25 / 7.5."""
    rec = recommended or {}
    steps = options.steps if options.steps is not None else rec.get("num_inference_steps", DEFAULT_STEPS)
    guidance = options.guidance_scale if options.guidance_scale is not None else rec.get("guidance_scale",
                                                                                          DEFAULT_GUIDANCE_SCALE)
    return SamplingInfo(int(steps), float(guidance))
