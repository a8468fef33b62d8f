"""Stable Diffusion XL end to end on a tiny random SDXL pipeline (issue 15): two text encoders, the pooled text
embedding and size ids as `added_cond_kwargs`, zeros as the unconditional condition; `aptp prune` -> `finetune` ->
`export` -> `Runtime.generate`, whose images match diffusers' StableDiffusionXLPipeline with the same expert,
scheduler and noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from prune_fixtures import assert_experts_match_pipeline, prune_finetune_export, tiny_config, write_sdxl_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

PROMPTS = ["a red circle", "the blue circle on red"]


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return prune_finetune_export(write_sdxl_model(root / "sdxl", seed=2), root, "euler")


def test_sdxl_conditioning_from_data_and_defaults(tmp_path):
    from training.base_model import load_base_model
    from training.config import config_from_dict
    from training.data import ToyDataset, collate, flip_sizes

    model = write_sdxl_model(tmp_path / "sdxl")
    base = load_base_model(config_from_dict(tiny_config(model, tmp_path / "runs")).model)
    assert base.family == "sdxl" and base.force_zeros_for_empty_prompt and base.scaling_factor == 0.13025
    cond = base.conditioning(PROMPTS)
    assert cond.context.shape == (2, 12, 56) and cond.text_embeds.shape == (2, 16)  # 32 + 24 concatenated
    assert cond.time_ids.tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # default: training size, no crop
    # the toy images are 32x32, resized to 16: recorded as original size 32x32
    _, _, sizes = collate(ToyDataset(4, size=16), [0, 1], sizes=True)
    assert sizes.tolist() == [[32, 32, 0, 0]] * 2
    c2 = base.conditioning(PROMPTS, torch.tensor([[40, 60, 0, 9], [32, 32, 0, 0]]))
    assert c2.time_ids[0].tolist() == [40, 60, 0, 9, 16, 16]
    assert flip_sizes(torch.tensor([[40, 60, 0, 9]]), 16).tolist() == [[40, 60, 0, 24 - 16 - 9]]
    # the UNet reads text_embeds and time_ids: changing either changes its output
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ref = base.unet(x, t, **cond.kwargs()).sample
    assert not torch.allclose(ref, base.unet(x, t, **c2.kwargs()).sample)
    # the pipeline's own encode_prompt gives the same condition
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model), local_files_only=True, add_watermarker=False)
    pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    torch.testing.assert_close(pe, cond.context, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pp, cond.text_embeds, rtol=1e-5, atol=1e-6)
    assert not ne.any() and not npp.any()  # force_zeros_for_empty_prompt
    # a dropped caption ("") is trained on the zeros sampling uses for the unconditional half
    c3 = base.conditioning(["", PROMPTS[0]])
    assert not c3.context[0].any() and not c3.text_embeds[0].any()
    torch.testing.assert_close(c3.context[1], cond.context[0])


def test_sdxl_export_manifest(sdxl_run):
    from engines.manifest import FORMAT_VERSION, read_manifest

    _, _, out, manifest, report, _ = sdxl_run
    m = read_manifest(out)
    assert m.family == "sdxl" and m.format_version == FORMAT_VERSION
    assert m.added_cond.text_embeds_dim == 16 and m.added_cond.image_size == (16, 16)
    assert m.text_encoder.pooled_dim == 16 and m.text_encoder.uncond == "zeros"
    assert m.text_encoder.hidden_size == 56 and "json_2" in m.tokenizer.files
    tok2 = json.loads((out / m.tokenizer.files["json_2"].path).read_text())
    assert tok2["padding"]["pad_token"] == "!"  # SDXL's second tokenizer pads with "!"
    for key, g in report["graphs"].items():
        assert g["verified"] and max(g["max_rel_error"].values()) <= 1e-4, key


def test_sdxl_runtime_matches_the_diffusers_pipeline(sdxl_run):
    """Acceptance: Runtime.generate (onnxruntime, numpy Euler) vs StableDiffusionXLPipeline with the same expert,
    diffusers' EulerDiscreteScheduler and the same initial noise: >= 40 dB for every expert."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from engines import Runtime
    from training.base_model import load_base_model

    cfg, run, out, manifest, _, _ = sdxl_run
    rt = Runtime.load(out)
    base = load_base_model(cfg.model)
    cond, ref = rt.condition(PROMPTS), base.conditioning(PROMPTS)
    np.testing.assert_allclose(cond.context, ref.context.numpy(), atol=1e-4)
    np.testing.assert_allclose(cond.added["text_embeds"], ref.text_embeds.numpy(), atol=1e-4)
    np.testing.assert_array_equal(cond.added["time_ids"], ref.time_ids.numpy())
    uncond = rt.uncond()
    assert not uncond.context.any() and not uncond.added["text_embeds"].any()

    pipe = StableDiffusionXLPipeline.from_pretrained(str(cfg.model.path), local_files_only=True,
                                                     add_watermarker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(manifest.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert_experts_match_pipeline(rt, pipe, "unet", run, manifest, PROMPTS, "euler", steps=4, guidance=5.0)


def test_sdxl_export_serves_bitwise_through_the_step_batcher(sdxl_run):
    """The server's step-level batching carries text_embeds and time_ids too: its images are Runtime.generate's."""
    from engines import Runtime
    from engines.serving.batching import Batcher
    from engines.serving.config import ServeConfig

    out = sdxl_run[2]
    rt = Runtime.load(out, threads=1)
    ref = rt.generate([PROMPTS[1]] * 2, steps=3, seed=4, scheduler="euler")
    with Batcher(rt, ServeConfig(batching="step", workers=1, max_batch=4)) as b:
        b.warm_up()
        first = b.submit(PROMPTS[0], n=1, steps=2, seed=1, scheduler="euler")  # shares UNet calls with the next
        got = [r.image for r in b.submit(PROMPTS[1], n=2, steps=3, seed=4, scheduler="euler").result(60)]
        first.result(60)
    for a, c in zip(ref, got, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(c))


def test_older_manifests_load_with_their_family_and_vae_precision_rule(sdxl_run, tmp_path):
    from diffusers import AutoencoderKL

    from aptp_export.families import MODEL_FAMILIES
    from engines.errors import ManifestError
    from engines.manifest import AddedCondInfo, Manifest

    d = json.loads((sdxl_run[2] / "manifest.json").read_text())
    with pytest.raises(ManifestError, match="sdxl export needs added_cond"):
        Manifest.from_dict({k: v for k, v in d.items() if k != "added_cond"})
    with pytest.raises(ManifestError, match="pooled_dim"):
        Manifest.from_dict(dict(d, text_encoder=dict(d["text_encoder"], pooled_dim=7)))
    v2 = {k: v for k, v in d.items() if k not in ("family", "added_cond", "openvino", "sampling")}
    v2["format_version"], v2["text_encoder"] = 2, {"files": d["text_encoder"]["files"],
                                                   "hidden_size": d["text_encoder"]["hidden_size"]}
    v2["tokenizer"] = {"files": {"json": d["tokenizer"]["files"]["json"]}}
    m = Manifest.from_dict(v2)
    assert m.family == "sd" and m.added_cond is None and m.text_encoder.uncond == "empty_prompt"
    assert Manifest.from_dict(dict(v2, latent=False, vae_decoder=None)).family == "pixel"
    assert m.to_dict() == v2  # written back as version 2, key for key
    with pytest.raises(ManifestError, match="needs json_2"):
        Manifest.from_dict(dict(d, tokenizer={"files": {"json": d["tokenizer"]["files"]["json"]}}))
    with pytest.raises(ManifestError, match="'pixel' but latent is true"):
        Manifest.from_dict(dict(v2, format_version=3, family="pixel"))
    # time_ids come from the export's image size, height first (SDXL's (h, w) order)
    assert AddedCondInfo(16, (768, 1024)).time_ids() == [768, 1024, 0, 0, 768, 1024]
    # fp16 SDXL exports keep a VAE decoder that asks for upcasting (SDXL's VAE overflows in fp16) in fp32
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4)
    sdxl, sd = MODEL_FAMILIES["sdxl"], MODEL_FAMILIES["sd"]
    assert vae.config.force_upcast and sdxl.vae_precision(vae, "fp16") == "fp32"
    assert sdxl.vae_precision(vae, "fp32") == "fp32"
    assert sd.vae_precision(vae, "fp16") == "fp16"  # SD 1.x / 2.x pipelines decode in fp16
    vae.register_to_config(force_upcast=False)  # e.g. madebyollin/sdxl-vae-fp16-fix
    assert sdxl.vae_precision(vae, "fp16") == "fp16"
