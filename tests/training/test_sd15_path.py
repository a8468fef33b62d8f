"""Stable Diffusion 1.5's configuration through the whole path: a tiny SD-1.5-style pipeline (CLIP width
context, 8 attention heads at every level, 1x1-conv proj_in/proj_out, epsilon prediction, SD 1.5's
PNDMScheduler config) is pruned, fine-tuned and exported, and the torch-free runtime's images match
diffusers' StableDiffusionPipeline running the same expert with the same noise and sampler (>= 40 dB)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from prune_fixtures import SD15_SCHEDULER, TINY_SD15_UNET, tiny_config, write_sd_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "the blue circle on the red"]
SEED = 3
STEPS = 5
MIN_PSNR = 40.0


def test_sd15_space_has_eight_heads_per_attention_and_conv_projections(tmp_path):
    """The architecture space of the SD 1.5-style UNet: every self- and cross-attention of every transformer
    is a group of 8 head units; the projections are 1x1 convolutions; the base model resolves SD 1.5's
    settings (epsilon from the scheduler, the tokenizer's length, no VAE-factor surprises)."""
    from aptp_export import ArchSpace
    from training.base_model import load_base_model
    from training.config import config_from_dict

    model = write_sd_model(tmp_path / "sd", family="sd15")
    cfg = config_from_dict(tiny_config(model, tmp_path / "runs"))
    base = load_base_model(cfg.model)
    assert base.kind == "latent" and base.prediction_type == "epsilon"
    assert base.sample_size == 8 and base.image_size == 16 and base.text_len == 12
    assert base.unet.config.attention_head_dim == 8 and not base.unet.config.use_linear_projection
    transformers = [n for n, m in base.unet.named_modules() if type(m).__name__ == "Transformer2DModel"]
    # 2 attention down blocks x 1 layer + the mid block + 2 attention up blocks x (1 + 1) layers
    assert len(transformers) == 7
    for n in transformers:
        t = base.unet.get_submodule(n)
        assert isinstance(t.proj_in, torch.nn.Conv2d) and isinstance(t.proj_out, torch.nn.Conv2d)
    space = ArchSpace.from_unet(base.unet)
    heads = [g for g in space.width_groups if g.kind == "attn_heads"]
    assert sorted(g.name for g in heads) == sorted(f"{n}.transformer_blocks.0.{a}" for n in transformers
                                                   for a in ("attn1", "attn2"))
    assert all(g.num_units == 8 for g in heads)
    widths = dict(zip(TINY_SD15_UNET["block_out_channels"], (2, 3, 4), strict=True))  # channels / 8 heads
    for g in heads:
        assert g.unit_channels == widths[base.unet.get_submodule(g.name).inner_dim]

    # the sampling config is the model's own file (prediction_type resolved, an override included)
    assert base.scheduler_config == {**SD15_SCHEDULER, "prediction_type": "epsilon"}
    over = load_base_model(config_from_dict(tiny_config(model, tmp_path / "runs",
                                                        model={"prediction_type": "v_prediction"})).model)
    assert over.scheduler_config["prediction_type"] == over.prediction_type == "v_prediction"


@pytest.fixture(scope="module")
def sd15_export(tmp_path_factory):
    from training.config import config_from_dict
    from training.export_run import export_run
    from training.finetune import run_finetune
    from training.prune import run_prune

    root = tmp_path_factory.mktemp("sd15")
    model = write_sd_model(root / "sd", seed=1, family="sd15")
    cfg = config_from_dict(tiny_config(model, root / "runs", router={"num_experts": 2},
                                       prune={"steps": 2, "warmup_steps": 1, "batch_size": 4},
                                       finetune={"steps": 2, "batch_size": 2, "caption_dropout": 0.0}))
    run = root / "run"
    run_prune(cfg, run, progress=False)
    run_finetune(run, progress=False)
    manifest, _ = export_run(run, root / "engines", progress=False)
    return model, run, root / "engines", manifest


def test_sd15_manifest_samples_with_the_models_own_scheduler_config(sd15_export):
    """The manifest carries SD 1.5's scheduler file, not the DDPM the training loop rebuilds from it: DDIM's
    last step ends on alphas_cumprod[0] (set_alpha_to_one false), PNDM is PLMS only, Euler keeps its own
    linspace spacing, as diffusers builds each of them from the model directory."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    from engines.schedulers import make_scheduler

    model, _, _, manifest = sd15_export
    config = manifest.scheduler.config
    assert config == {**SD15_SCHEDULER, "prediction_type": "epsilon"}
    for name, cls in (("ddim", DDIMScheduler), ("pndm", PNDMScheduler), ("euler", EulerDiscreteScheduler)):
        ours, ref = make_scheduler(name, config), cls.from_pretrained(str(model / "scheduler"))
        ours.set_timesteps(STEPS)
        ref.set_timesteps(STEPS)
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), atol=1e-4, err_msg=name)
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
        if name != "euler":
            assert float(ours.final_alpha_cumprod) == pytest.approx(float(ref.final_alpha_cumprod), rel=1e-7)


def _pipeline(model, expert, scheduler):
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    before = dict(scheduler.config)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(model / "vae")),
        text_encoder=CLIPTextModel.from_pretrained(str(model / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(str(model / "tokenizer")), unet=expert, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # the pipeline rewrites steps_offset != 1 / clip_sample=True in place; SD 1.5's config needs neither
    assert dict(pipe.scheduler.config) == before
    return pipe


def test_sd15_runtime_matches_stable_diffusion_pipeline(sd15_export):
    """engines.Runtime.generate vs diffusers' StableDiffusionPipeline on the same expert, sampler config,
    numpy noise (engines/denoise.py: both scale it by init_noise_sigma), guidance and steps; unconditional
    context "" on both sides (the pipeline's choice when negative_prompt is None)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
    from engines_export_fixture import psnr

    from aptp_export.expert_io import load_expert
    from engines import Runtime
    from engines.denoise import initial_noise
    from training.rundir import RunDir

    model, run, out, manifest = sd15_export
    rt = Runtime.load(out)
    shape = (manifest.in_channels, *manifest.sample_size)
    latents = torch.from_numpy(initial_noise([SEED + i for i in range(len(PROMPTS))], shape))
    classes = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}
    measured = {}
    for k in range(len(manifest.experts)):
        expert = load_expert(RunDir(run).expert(k))
        pipe = _pipeline(model, expert, PNDMScheduler.from_config(manifest.scheduler.config))
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
        np.testing.assert_allclose(rt.encode_text(PROMPTS), cond.numpy(), atol=1e-4)
        np.testing.assert_allclose(rt.uncond().context[0], uncond[0].numpy(), atol=1e-4)
        # every sampler on expert 0, and guidance_rescale (diffusers' rescale_noise_cfg); on expert 1
        # SD 1.5's own (PNDM), with and without guidance
        runs = [(n, 7.5, 0.0) for n in classes] + [("ddim", 7.5, 0.7), ("ddim", 12.0, 1.0)] if k == 0 else \
            [("pndm", 7.5, 0.0), ("pndm", 1.0, 0.0)]
        for name, guidance, rescale in runs:
            pipe.scheduler = classes[name].from_config(manifest.scheduler.config)
            with torch.no_grad():
                ref = pipe(PROMPTS, height=16, width=16, num_inference_steps=STEPS, guidance_scale=guidance,
                           guidance_rescale=rescale, latents=latents.clone(),
                           output_type="np").images  # [B, H, W, 3] in [0, 1]
            images = rt.generate(PROMPTS, steps=STEPS, guidance_scale=guidance, seed=SEED, expert=k,
                                 scheduler=name, guidance_rescale=rescale)
            got = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
            assert got.shape == ref.shape
            assert ref.std() > 0.05  # not a flat or saturated image that would match anything
            measured[f"expert {k} {name} g={guidance} rescale={rescale}"] = [
                round(psnr(g, r), 2) for g, r in zip(got, ref, strict=True)]
            if rescale:  # the rescale really changes the images: the comparison is not the plain-CFG one again
                plain = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in rt.generate(
                    PROMPTS, steps=STEPS, guidance_scale=guidance, seed=SEED, expert=k, scheduler=name)])
                measured[f"expert {k} {name} rescale={rescale} vs none"] = [
                    round(psnr(g, r), 2) for g, r in zip(got, plain, strict=True)]
                # measured here: 59 dB to the pipeline, 36-40 (0.7) and 26-30 dB (1.0) to the unrescaled images
                assert min(measured[f"expert {k} {name} g={guidance} rescale={rescale}"]) > \
                    max(measured[f"expert {k} {name} rescale={rescale} vs none"]) + 10
    print("\nPSNR (dB) runtime vs StableDiffusionPipeline:\n" + json.dumps(measured, indent=1))
    worst = min(min(v) for key, v in measured.items() if "vs none" not in key)
    assert worst >= MIN_PSNR, measured
