"""Tiny seeded base models on disk for the training tests (toy layout and Stable Diffusion layout)."""

from __future__ import annotations

import json
from pathlib import Path

TINY_UNET = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 384,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
    "use_linear_projection": True,
}

TOY_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
                 "clip_sample": True}


def write_tiny_vae(path: Path, scaling_factor: float = 0.18215) -> None:
    """A tiny AutoencoderKL (factor 2, 4 latent channels) saved to `path`."""
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  latent_channels=4, norm_num_groups=4, sample_size=16,
                  scaling_factor=scaling_factor).save_pretrained(str(path), safe_serialization=True)


def _perturb_(module, seed: int) -> None:
    """Non-default weights: random GroupNorm affine and biases, so no unit is trivially zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def write_toy_model(path: Path, unet_config: dict | None = None, seed: int = 0, max_length: int = 8) -> Path:
    """A pixel-space model dir in the toy teacher's layout with a random tiny UNet."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(unet_config or TINY_UNET))
    _perturb_(unet, seed)
    path = Path(path)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler(**TOY_SCHEDULER).save_pretrained(path / "scheduler")
    (path / "text_encoder.json").write_text(json.dumps({"type": "token_states", "model": "all-MiniLM-L6-v2",
                                                        "max_length": max_length}))
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: every byte maps to a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tiny_clip_tokenizer(path: Path) -> None:
    """A real CLIPTokenizer vocabulary (byte-level BPE: vocab.json + merges.txt) covering a few words."""
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "b l", "bl u", "blu e</w>",
              "o n</w>", "t h", "th e</w>"]
    for m in merges:
        a, b = m.split()
        vocab_list.append(a + b)
    vocab_list += ["</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=12)
    tok.save_pretrained(str(path))


# SD 1.5's UNet shape in miniature: 8 attention heads at every level (diffusers' `attention_head_dim` is the
# head count, an int in SD 1.5's config), 1x1-conv proj_in/proj_out (no linear projection), attention at the
# outer levels and none at the innermost, as CrossAttn x3 + Down in the real one. Channels are multiples of 8
# (heads) and of the 8 GroupNorm groups.
TINY_SD15_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (16, 24, 32),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "use_linear_projection": False,
}

# runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json, key for key: PNDM, PLMS only, epsilon
# (diffusers' default: the file names no prediction_type); clip_sample is not a PNDM key, it is there for the
# DDIM/DDPM schedulers built from the same file
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}


def write_sd_model(path: Path, seed: int = 0, prediction_type: str = "v_prediction", family: str = "sd21") -> Path:
    """A latent model dir in Stable Diffusion's layout with tiny random parts (VAE factor 2, 4 latent channels).

    family "sd21" (default): the tiny SD-2-style UNet (linear projection) and a DDPM scheduler config of
    `prediction_type`. family "sd15": TINY_SD15_UNET and SD 1.5's PNDMScheduler config (epsilon;
    `prediction_type` is ignored)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    write_tiny_clip_tokenizer(path / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=12,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    text.save_pretrained(str(path / "text_encoder"))
    write_tiny_vae(path / "vae")
    if family == "sd15":
        cfg = TINY_SD15_UNET
    elif family == "sd21":
        cfg = dict(TINY_UNET, sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32)
    else:
        raise ValueError(f"family must be sd21 or sd15, got {family!r}")
    unet = UNet2DConditionModel(**cfg)
    _perturb_(unet, seed)
    unet.save_pretrained(str(path / "unet"), safe_serialization=True)
    if family == "sd15":
        (path / "scheduler").mkdir(parents=True, exist_ok=True)
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
    else:
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      prediction_type=prediction_type).save_pretrained(str(path / "scheduler"))
    return path


def tiny_config(model_dir: Path, runs_dir: Path, **sections) -> dict:
    """A config dict for a few fast pruning steps on `model_dir`."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "runs_dir": str(runs_dir),
        "model": {"path": str(model_dir)},
        "data": {"type": "toy", "num_samples": 64},
        "router": {"num_experts": 4},
        "prune": {"budget": 0.6, "steps": 6, "warmup_steps": 2, "batch_size": 8, "lr": 0.05,
                  "lr_warmup_steps": 0, "checkpoint_every": 2, "log_every": 1},
        "finetune": {"steps": 3, "batch_size": 4},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


# A tiny SDXL-class UNet: text_time addition embedding (text_embeds of the second encoder's projection width),
# 2 transformer layers at the attention level, heads per level, linear projections (as SDXL).
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    cross_attention_dim=32 + 24,  # penultimate states of both text encoders, concatenated
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
)


def write_sdxl_model(path: Path, seed: int = 0, force_zeros: bool = True) -> Path:
    """A latent model dir in Stable Diffusion XL's layout with tiny random parts: two CLIP tokenizers (the second
    pads with "!", as SDXL's), CLIPTextModel + CLIPTextModelWithProjection, a VAE with SDXL's scaling factor,
    an SDXL-class UNet, SDXL's Euler scheduler config and model_index.json."""
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    path = Path(path)
    torch.manual_seed(seed)
    write_tiny_clip_tokenizer(path / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), pad_token="!")
    tok2.save_pretrained(str(path / "tokenizer_2"))

    def clip_config(hidden, heads, **kw):
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden + 5,
                              num_attention_heads=heads, num_hidden_layers=3, max_position_embeddings=12,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **kw)

    CLIPTextModel(clip_config(32, 4)).save_pretrained(str(path / "text_encoder"))
    CLIPTextModelWithProjection(clip_config(24, 4, projection_dim=16)).save_pretrained(str(path / "text_encoder_2"))
    write_tiny_vae(path / "vae", scaling_factor=0.13025)  # SDXL's VAE scaling (PixArt uses SDXL's VAE)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    _perturb_(unet, seed)
    unet.save_pretrained(str(path / "unet"), safe_serialization=True)
    EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                           beta_end=0.012, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                           interpolation_type="linear", use_karras_sigmas=False).save_pretrained(str(path / "scheduler"))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": force_zeros,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return path


def write_tiny_t5_tokenizer(path: Path, max_length: int = 12):
    """A real T5 tokenizer (SentencePiece-style Unigram with Metaspace, `</s>` appended, `<pad>` = 0) over a
    few words and the single letters, built with `tokenizers` offline; saved as T5TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = ("a red blue green circle square the on of in letter small big and above below digit".split())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                          model_max_length=max_length)
    tok.save_pretrained(str(path))
    return tok


TINY_PIXART = dict(sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                   out_channels=8, cross_attention_dim=16, caption_channels=16, patch_size=2)


def write_pixart_model(path: Path, seed: int = 0) -> Path:
    """A PixArt-Sigma pipeline directory with tiny random parts: T5 tokenizer and T5EncoderModel (d_model 16),
    a VAE with SDXL's scaling factor (PixArt's), a PixArt transformer with learned sigma, PixArt's
    DPM-Solver scheduler config and model_index.json."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = write_tiny_t5_tokenizer(path / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                            decoder_start_token_id=0)).save_pretrained(str(path / "text_encoder"))
    write_tiny_vae(path / "vae", scaling_factor=0.13025)  # SDXL's VAE scaling (PixArt uses SDXL's VAE)
    transformer = PixArtTransformer2DModel(**TINY_PIXART)
    _perturb_(transformer, seed)
    transformer.save_pretrained(str(path / "transformer"), safe_serialization=True)
    DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                prediction_type="epsilon").save_pretrained(str(path / "scheduler"))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return path


def assert_experts_match_pipeline(rt, pipe, denoiser_attr: str, run, manifest, prompts, scheduler: str,
                                  steps: int = 4, guidance: float = 5.0, seeds=(7, 8), **pipe_kwargs) -> None:
    """For every expert of the export `rt` serves: Runtime.generate against the diffusers pipeline `pipe`
    (its scheduler already the export's) with the run's fine-tuned expert as `pipe.<denoiser_attr>` and the
    same initial noise: >= 40 dB per image; another seed gives another image (< 30 dB)."""
    import numpy as np
    import torch
    from engines_export_fixture import psnr

    from aptp_export.expert_io import load_expert
    from engines.denoise import initial_noise
    from training.rundir import RunDir

    seeds = list(seeds)
    shape = (manifest.in_channels, *manifest.sample_size)
    h, w = (int(manifest.sample_size[0]) * 2, int(manifest.sample_size[1]) * 2)  # the tiny VAEs' factor 2
    for k in range(len(manifest.experts)):
        res = rt.generate_with_info(prompts, steps=steps, guidance_scale=guidance, seed=seeds, scheduler=scheduler,
                                    expert=k)
        setattr(pipe, denoiser_attr, load_expert(RunDir(run).expert(k)))
        with torch.no_grad():
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=h, width=w,
                          latents=torch.from_numpy(initial_noise(seeds, shape)), output_type="np",
                          **pipe_kwargs).images
        for i, (img, want) in enumerate(zip(res.images, images, strict=True)):
            value = psnr(np.asarray(img, np.float64) / 255.0, want)
            print(f"expert {k}, prompt {i}: PSNR {value:.1f} dB")
            assert value >= 40, f"expert {k}, prompt {i}: PSNR {value:.1f} dB"
        other = rt.generate(prompts[:1], steps=steps, guidance_scale=guidance, seed=99, scheduler=scheduler,
                            expert=k)[0]
        assert psnr(np.asarray(other, np.float64) / 255.0, images[0]) < 30  # another seed: another image


def assert_run_experts(cfg, run, summary, cls, prompts) -> None:
    """The 2 fine-tuned experts of a tiny run (prune_finetune_export): of the denoiser class `cls`, each with the
    parameters of the base model materialised at its architecture vector (no more than the dense model's) and a
    finite prediction of the latent's shape; MACs fractions in (0, 1]."""
    import torch

    from aptp_export import ArchSpace
    from aptp_export.expert_io import load_expert, read_expert_info
    from training.base_model import load_base_model
    from training.rundir import RunDir

    assert len(summary["expert_macs"]) == 2 and all(0.0 < m <= 1.0 for m in summary["expert_macs"])
    assert min(summary["expert_macs"]) < 0.9  # physically pruned: the graphs downstream are smaller ones
    base = load_base_model(cfg.model)
    space = ArchSpace.from_unet(base.unet)
    cond = base.conditioning(list(prompts[:2]))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([30, 700])
    for k in range(2):
        expert = load_expert(RunDir(run).expert(k))
        assert isinstance(expert, cls)
        _, arch, _ = read_expert_info(RunDir(run).expert(k))
        n_params = sum(p.numel() for p in expert.parameters())
        assert n_params <= sum(p.numel() for p in base.unet.parameters())
        assert n_params == sum(p.numel() for p in space.materialize(base.unet, arch).parameters())
        with torch.no_grad():
            out = cond.predict(expert, x, t)
        assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
        assert space.macs(arch.tolist(), 8, 8, base.text_len) <= space.dense_macs(8, 8, base.text_len)


def prune_finetune_export(model: Path, root: Path, scheduler: str | None, **model_settings):
    """The whole training path on a tiny pipeline directory: 3 pruning steps with 2 experts, 2 fine-tuning
    steps, export with `scheduler` (None: the export's default). `model_settings` go to the config's `model`
    section. The gates start unbiased (router.gumbel_offset 0; the reference's 3.0 keeps every unit for the first
    steps), so that the experts come out physically pruned and the export and runtime run pruned graphs.
    Returns (cfg, run dir, export dir, manifest, export report, prune summary)."""
    from training.config import config_from_dict
    from training.export_run import export_run
    from training.finetune import run_finetune
    from training.prune import run_prune

    cfg = config_from_dict(tiny_config(model, root / "runs", model=model_settings,
                                       router={"num_experts": 2, "gumbel_offset": 0.0},
                                       prune={"steps": 3, "warmup_steps": 1, "batch_size": 4},
                                       finetune={"steps": 2, "batch_size": 2}))
    run = root / "run"
    summary = run_prune(cfg, run, progress=False)
    run_finetune(run, progress=False)
    out = root / "export"
    manifest, report = export_run(run, out, scheduler=scheduler, progress=False)
    return cfg, run, out, manifest, report, summary


TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=16 + 8, out_channels=4,
                pos_embed_max_size=8)


def write_sd3_model(path: Path, seed: int = 0, t5: bool = True, **scheduler) -> Path:
    """A Stable Diffusion 3 pipeline directory with tiny random parts: two CLIP tokenizers (the second pads with
    "!") and CLIPTextModelWithProjection encoders (hidden 32 and 24, projections 16 and 8: pooled 24, context
    56 padded to T5's 64), a T5 tokenizer and T5EncoderModel (d_model 64; left out with t5=False), a VAE with
    SD3's scaling and shift, an SD3 transformer, SD3's flow-matching scheduler (shift 3; `scheduler` changes its
    config, e.g. use_dynamic_shifting=True) and model_index.json."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    write_tiny_clip_tokenizer(path / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    CLIPTokenizer.from_pretrained(str(path / "tokenizer"), pad_token="!").save_pretrained(str(path / "tokenizer_2"))
    for sub, hidden, proj in (("text_encoder", 32, 16), ("text_encoder_2", 24, 8)):
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden + 5, num_attention_heads=4,
            num_hidden_layers=3, max_position_embeddings=12, projection_dim=proj, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(str(path / sub))
    if t5:
        t5tok = write_tiny_t5_tokenizer(path / "tokenizer_3")
        T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=64, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0)).save_pretrained(str(path / "text_encoder_3"))
    write_tiny_vae(path / "vae", scaling_factor=1.5305)
    cfg = json.loads((path / "vae" / "config.json").read_text())
    (path / "vae" / "config.json").write_text(json.dumps({**cfg, "shift_factor": 0.0609}))
    transformer = SD3Transformer2DModel(**TINY_SD3)
    _perturb_(transformer, seed)
    transformer.save_pretrained(str(path / "transformer"), safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(**{"num_train_timesteps": 1000, "shift": 3.0, **scheduler}).save_pretrained(
        str(path / "scheduler"))
    parts = {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else [None, None],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", **parts}))
    return path
