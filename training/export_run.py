"""Export a finished training run (RUN/prune + RUN/experts) to an export directory.

    manifest, report = export_run("runs/toy", "export/toy", with_dense=True)

Loads the run's resolved config, its base model, the router (predictor + codes) and every
fine-tuned expert file into an `ExportParts` and hands it to `manifest_writer.write_export_dir`, which
exports and verifies every graph against torch and writes manifest.json last. Expert MACs come from the
architecture space at the model's sample size and text length (batch 1, true MACs); `share` is the
fraction of training prompts the router sent to each expert at the end of the pruning phase.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizerFast

from aptp_export import ArchSpace, load_expert
from aptp_export.expert_io import read_expert_info
from aptp_export.export_options import ExportOptions
from aptp_export.export_parts import ExpertModel, ExportParts
from aptp_export.manifest_writer import write_export_dir
from aptp_export.rounding import pad_expert, round_units
from engines.errors import UserError

from .base_model import load_base_model, t5_fast_tokenizer
from .router import Router
from .rundir import RunDir
from .text import SentenceEncoder


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, options: ExportOptions | None = None,
               **changes):
    """Export run `run_dir` to `out_dir`; returns (manifest, report) of write_export_dir.

    `options` (default ExportOptions()) with `changes` applied, e.g. `export_run(run, out, with_dense=True)`.
    `round_to` > 1 rounds every expert's kept channels per width group up to a multiple of that many
    channels (aptp_export.rounding: added units are zero, the function is unchanged, MACs recomputed)."""
    options = (options or ExportOptions()).replace(**changes)
    round_to = options.round_to

    run = RunDir(run_dir)
    run.require_pruned()
    run_dir = run.root
    cfg = run.config()
    router = Router.load(run.prune_dir)
    meta = json.loads(run.router_meta.read_text())
    k = router.num_experts
    missing = [run.expert(i) for i in range(k) if not (run.expert(i) / "arch.json").is_file()]
    if missing:
        raise UserError(f"{run_dir}: {len(missing)} of {k} experts are not fine-tuned yet (first missing: "
                        f"{missing[0]}); run `aptp finetune --run {run_dir}`")
    base = load_base_model(cfg.model)
    space = ArchSpace.from_unet(base.unet, depth_blocks=cfg.model.depth_blocks)
    h = w = base.sample_size
    text_len = base.text_len
    dense_macs = space.dense_macs(h, w, text_len)
    shares = meta.get("train_shares") or [0.0] * k
    experts = []
    for i in range(k):
        unet = load_expert(run.expert(i))
        _, arch, _ = read_expert_info(run.expert(i))
        if arch.numel() != space.num_units:
            raise UserError(f"{run.expert(i)}: its vector has {arch.numel()} units, the base model's space "
                            f"{space.num_units}; the expert was not made from this run's base model")
        if round_to > 1:
            rounded = round_units(space, arch, round_to)
            if bool((rounded != (arch > 0.5).float()).any()):
                unet = pad_expert(space, unet, arch, rounded)
            arch = rounded
        macs = space.macs(arch.tolist(), h, w, text_len)
        experts.append(ExpertModel(unet, macs, share=float(shares[i])))
    sentence = SentenceEncoder(cfg.router.sentence_encoder)
    family = base.family_info
    te = base.text_encoder
    with tempfile.TemporaryDirectory() as scratch:
        # pixel (the toy layout): MiniLM token states, one tokenizer for both encoders. Latent: the pipeline's
        # CLIP text encoder (no attention mask, as the pipelines call it) with its own tokenizer and padding
        # token, the router keeping the sentence encoder's tokenizer; SDXL adds the second encoder and its
        # tokenizer, and zeros as the unconditional condition when the pipeline asks for them. PixArt: T5, run
        # with its attention mask (the transformer reads the mask too). SD3: both CLIPs and T5 (when the model
        # has it), each tokenizer to its own length, the VAE's latent shift.
        latent, second = family.latent, family.second_text_encoder
        sd3 = family.text_graph == "sd3"
        t5 = sd3 and te.model_3 is not None
        parts = ExportParts(
            sample_size=(h, w), in_channels=base.sample_channels, text_len=text_len,
            context_dim=_context_dim(base.unet.config), dense_macs=dense_macs,
            scheduler_config=dict(base.scheduler_config), sampling=_recommended_sampling(base.path, family),
            dense=ExpertModel(base.unet, dense_macs, share=0.0) if options.with_dense else None,
            text_encoder=te.model if latent else te.enc.model,
            tokenizer=_fast_tokenizer_json(base.path / "tokenizer", scratch) if latent else sentence.model_dir,
            pad_token=te.tokenizer.pad_token if latent else None,
            text_encoder_uses_mask=not latent or family.name == "pixart",  # T5 runs with its mask
            text_encoder_2=te.model_2 if second else None,
            tokenizer_2=_fast_tokenizer_json(base.path / "tokenizer_2", scratch) if second else None,
            pad_token_2=te.tokenizer_2.pad_token if second else None,
            text_encoder_3=te.model_3 if t5 else None,
            tokenizer_3=_fast_tokenizer_json(base.path / "tokenizer_3", scratch) if t5 else None,
            token_lengths=({"json": te.clip_length, "json_2": te.clip_length, **({"json_3": te.t5_length} if t5 else {})}
                           if sd3 else None),
            uncond="zeros" if base.force_zeros_for_empty_prompt else "empty_prompt",
            image_size=(base.image_size, base.image_size) if family.added_cond_dims(base.unet.config) else None,
            router_encoder=sentence.model, router_head=router.scorer(),
            router_max_length=int(sentence.max_seq_length), embedding_dim=router.embed_dim,
            router_tokenizer=sentence.model_dir if latent else None,
            vae=base.vae, vae_scaling_factor=base.scaling_factor if latent else None, vae_shift_factor=base.shift_factor,
            budget=cfg.prune.budget, base_model=str(cfg.model.path or "builtin:toy-teacher"),
            info={"run": str(run_dir), "arch_space": space.to_dict()})
        return write_export_dir(out_dir, experts, parts, options)


def _context_dim(config) -> int:
    """Width of the text context the denoiser reads: a UNet's cross_attention_dim, a PixArt transformer's
    caption_channels (T5's width; it projects it to its own), an SD3 transformer's joint_attention_dim."""
    c = dict(config)
    for key in ("caption_channels", "joint_attention_dim"):
        if c.get(key):
            return int(c[key])
    return int(c["cross_attention_dim"])


def _fast_tokenizer_json(tokenizer_dir: Path, scratch: str | os.PathLike) -> Path:
    """A pipeline's tokenizer/ as a tokenizers-library file: its tokenizer.json if present, else converted
    into a directory under `scratch` from the slow files: CLIP's vocab.json + merges.txt, T5's spiece.model."""
    if (tokenizer_dir / "tokenizer.json").is_file():
        return tokenizer_dir / "tokenizer.json"
    if (tokenizer_dir / "spiece.model").is_file():  # T5 (PixArt): SentencePiece only, as the official repos
        out = Path(scratch) / tokenizer_dir.name
        t5_fast_tokenizer(tokenizer_dir).save_pretrained(str(out))
        return out / "tokenizer.json"
    if not (tokenizer_dir / "vocab.json").is_file():
        raise UserError(f"{tokenizer_dir}: neither tokenizer.json nor vocab.json + merges.txt")
    out = Path(scratch) / tokenizer_dir.name
    CLIPTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True).save_pretrained(str(out))
    return out / "tokenizer.json"


def _recommended_sampling(model_dir, family) -> dict | None:
    """The model's sampling.json (the toy teacher ships one: guidance 3.0), else the guidance scale of the family's
    diffusers pipeline (SDXL 5.0, PixArt 4.5, SD3 7.0; families.Family.guidance_scale), else None."""
    path = Path(model_dir) / "sampling.json"
    if not path.is_file():
        return None if family.guidance_scale is None else {"guidance_scale": family.guidance_scale}
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON") from None
    return rec if isinstance(rec, dict) else None
