"""Stable Diffusion 3 (issue 25) training path on a tiny random SD3 pipeline: the conditioning equals
StableDiffusion3Pipeline.encode_prompt (CLIP-L + CLIP-G + T5 context, pooled projection; zeros without T5), the
flow-matching objective is diffusers' (noisy sample = FlowMatchEulerDiscreteScheduler.scale_noise, velocity
target, model timestep 1000 sigma), and `aptp prune` -> `finetune` -> `export` -> `Runtime.generate` match
StableDiffusion3Pipeline with the same expert, with and without T5, with a static and a resolution-dependent
shift."""

from __future__ import annotations

import pytest
import torch
from prune_fixtures import (
    assert_experts_match_pipeline,
    assert_run_experts,
    prune_finetune_export,
    tiny_config,
    write_sd3_model,
)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

PROMPTS = ["a red circle", "the small blue square above a big green circle"]
T5_LEN = 7  # T5 tokens of the end-to-end runs (the tiny CLIP tokenizers' own length is 12)


def _base(model, tmp_path):
    from training.base_model import load_base_model
    from training.config import config_from_dict

    return load_base_model(config_from_dict(tiny_config(model, tmp_path / "runs",
                                                        model={"text_max_length": 12})).model)


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_conditioning_equals_the_pipeline(t5, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    model = write_sd3_model(tmp_path / "sd3", t5=t5)
    base = _base(model, tmp_path)
    assert base.family == "sd3" and base.text_len == 12 + 12 and base.prediction_type == "flow_prediction"
    assert base.shift_factor == pytest.approx(0.0609)
    cond = base.conditioning(PROMPTS)
    assert cond.context.shape == (2, 24, 64) and cond.text_embeds.shape == (2, 24)
    extra = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(str(model), local_files_only=True, **extra)
    pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=True,
                                         max_sequence_length=12)
    torch.testing.assert_close(pe, cond.context, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pp, cond.text_embeds, rtol=1e-5, atol=1e-6)
    empty = base.conditioning([""])
    torch.testing.assert_close(ne[:1], empty.context, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(npp[:1], empty.text_embeds, rtol=1e-5, atol=1e-6)
    assert bool(cond.context[:, 12:].any()) == t5  # T5's part, zeros without text_encoder_3


def test_sd3_flow_matching_objective_is_diffusers(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from training.losses import diffusion_loss, diffusion_target

    base = _base(write_sd3_model(tmp_path / "sd3"), tmp_path)
    ref = FlowMatchEulerDiscreteScheduler.from_config(base.scheduler_config)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    ts = base.scheduler.timesteps[t]
    sig = ts / 1000
    assert torch.all(sig[1:] > sig[:-1]) and 0 < float(sig[0]) < 0.01 and float(sig[-1]) == 1.0  # index -> noise
    # diffusers' training scripts: x_t = (1 - s) x0 + s noise; scale_noise is the same map
    for i in range(3):
        want = ref.scale_noise(x0[i:i + 1], ts[i:i + 1], noise[i:i + 1])
        torch.testing.assert_close(base.scheduler.add_noise(x0, noise, t)[i:i + 1], want, rtol=1e-6, atol=1e-6)
    target = diffusion_target(base.scheduler, x0, noise, t, base.prediction_type)
    assert torch.equal(target, noise - x0)
    loss = diffusion_loss(target, target, t, base.scheduler, 5.0, base.prediction_type)
    assert torch.equal(loss, torch.zeros(3))  # min-SNR is not applied to flow matching
    # the transformer reads 1000 sigma, not the index, and the pooled projection
    cond = base.conditioning(PROMPTS[:1] * 3)
    noisy = base.scheduler.add_noise(x0, noise, t)
    got = cond.predict(base.unet, noisy, t)
    with torch.no_grad():
        want = base.unet(noisy, encoder_hidden_states=cond.context, pooled_projections=cond.text_embeds,
                         timestep=ts).sample
    assert torch.equal(got, want)


@pytest.fixture(scope="module", params=["t5", "no_t5_dynamic_shift"])
def sd3_run(request, tmp_path_factory):
    """(cfg, run dir, export dir, manifest, export report, prune summary) of the whole path on a tiny SD3
    pipeline, exported with the default sampler: with T5 and SD3's static shift 3, and without T5 with
    resolution-dependent shifting (the manifest's mu); T5 gets 7 tokens, the CLIPs their 12 (unequal, so that a
    swap of the lengths anywhere fails)."""
    root = tmp_path_factory.mktemp("sd3")
    t5 = request.param == "t5"
    model = write_sd3_model(root / "sd3", seed=2, t5=t5, **({} if t5 else {"use_dynamic_shifting": True}))
    return (t5, *prune_finetune_export(model, root, None, text_max_length=T5_LEN))


def test_sd3_prune_and_finetune(sd3_run):
    from diffusers import SD3Transformer2DModel

    _, cfg, run, _, _, _, summary = sd3_run
    assert_run_experts(cfg, run, summary, SD3Transformer2DModel, PROMPTS)


def test_sd3_export_manifest(sd3_run):
    """The manifest of an SD3 export: the family, three (two without T5) tokenizers with their lengths, the
    pooled width, the VAE's shift, the flow sampler chosen by default (with mu under dynamic shifting: the
    pipeline's calculate_shift of 4 x 4 image tokens), every graph verified against torch."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    from engines.manifest import read_manifest

    t5, _, _, out, _, report, _ = sd3_run
    m = read_manifest(out)
    assert m.family == "sd3" and m.added_cond is None and m.text_encoder.pooled_dim == 24
    assert m.text_len == 12 + T5_LEN and m.text_encoder.hidden_size == 64 and tuple(m.sample_size) == (8, 8)
    assert sorted(m.tokenizer.files) == ["json", "json_2", *(["json_3"] if t5 else []), "router_json"]
    assert m.tokenizer.lengths == {"json": 12, "json_2": 12, **({"json_3": T5_LEN} if t5 else {})}
    assert m.vae_decoder.shift_factor == pytest.approx(0.0609) and m.scheduler.name == "flow_euler"
    assert (m.sampling.steps, m.sampling.guidance_scale) == (25, 7.0)  # no sampling.json: the pipeline's guidance
    if t5:
        assert m.scheduler.mu is None
    else:
        c = m.scheduler.config
        assert m.scheduler.mu == pytest.approx(calculate_shift(16, c["base_image_seq_len"], c["max_image_seq_len"],
                                                               c["base_shift"], c["max_shift"]), abs=1e-12)
    for key, g in report["graphs"].items():
        assert g["verified"] and max(g["max_rel_error"].values()) <= 1e-4, key


def test_sd3_runtime_matches_the_diffusers_pipeline(sd3_run):
    """Acceptance (issue 25): Runtime.generate (onnxruntime CLIP-L + CLIP-G [+ T5] text graph, MMDiT graphs with
    pooled_projections, numpy flow-matching Euler, VAE decode with the latent shift) vs StableDiffusion3Pipeline
    with the same expert, its own FlowMatchEulerDiscreteScheduler and the same initial noise: >= 40 dB."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline

    from engines import Runtime
    from training.base_model import load_base_model

    t5, cfg, run, out, manifest, _, _ = sd3_run
    rt = Runtime.load(out)
    base = load_base_model(cfg.model)
    cond, ref = rt.condition(PROMPTS), base.conditioning(PROMPTS)
    np.testing.assert_allclose(cond.context, ref.context.numpy(), atol=1e-4)
    np.testing.assert_allclose(cond.added["pooled_projections"], ref.text_embeds.numpy(), atol=1e-4)
    empty, uncond = base.conditioning([""]), rt.uncond()  # SD3 pipelines encode the empty negative prompt
    np.testing.assert_allclose(uncond.context, empty.context.numpy(), atol=1e-4)
    np.testing.assert_allclose(uncond.added["pooled_projections"], empty.text_embeds.numpy(), atol=1e-4)

    extra = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(str(cfg.model.path), local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    assert_experts_match_pipeline(rt, pipe, "transformer", run, manifest, PROMPTS, "flow_euler", steps=4,
                                  guidance=5.0, max_sequence_length=T5_LEN)


def test_sd3_export_serves_bitwise_through_the_step_batcher(sd3_run):
    """The server's step-level batching carries pooled_projections: its images are Runtime.generate's."""
    import numpy as np

    from engines import Runtime
    from engines.serving.batching import Batcher
    from engines.serving.config import ServeConfig

    rt = Runtime.load(sd3_run[3], threads=1)
    ref = rt.generate([PROMPTS[1]] * 2, steps=3, seed=4)
    with Batcher(rt, ServeConfig(batching="step", workers=1, max_batch=4)) as b:
        b.warm_up()
        first = b.submit(PROMPTS[0], n=1, steps=2, seed=1)  # shares UNet calls with the next
        got = [r.image for r in b.submit(PROMPTS[1], n=2, steps=3, seed=4).result(60)]
        first.result(60)
    for a, c in zip(ref, got, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(c))


def test_logit_normal_timestep_sampling(tmp_path):
    """model.timestep_sampling: uniform draws every index alike; logit_normal is diffusers' SD3 density
    (u = sigmoid(N(0, 1)), index floor(1000 u)): the same indices for the same normal draws, concentrated in the
    middle; the uniform draw is torch.randint's (runs before the option are reproduced)."""
    from training.base_model import load_base_model
    from training.config import config_from_dict

    model = write_sd3_model(tmp_path / "sd3")
    cfg = tiny_config(model, tmp_path / "runs", model={"text_max_length": 12, "timestep_sampling": "logit_normal"})
    base = load_base_model(config_from_dict(cfg).model)
    assert base.timestep_sampling == "logit_normal"
    t = base.sample_timesteps(20000, torch.Generator().manual_seed(0))
    z = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, (torch.sigmoid(z) * 1000).long())
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) <= 999
    middle = ((t >= 250) & (t < 750)).float().mean()
    assert abs(float(middle) - 0.728) < 0.015  # P(|z| < logit(0.75) = 1.0986) = 0.728; uniform: 0.5
    base.timestep_sampling = "uniform"
    u = base.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert torch.equal(u, torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0)))
    assert abs(float(((u >= 250) & (u < 750)).float().mean()) - 0.5) < 0.02


def test_both_phases_draw_t_from_the_configured_sampler(tmp_path, monkeypatch):
    """Pruning and fine-tuning draw their timesteps through BaseModel.sample_timesteps (so model.timestep_sampling
    reaches them): every t a phase trains on is one the sampler gave."""
    from training.base_model import BaseModel
    from training.config import config_from_dict
    from training.finetune import run_finetune
    from training.prune import run_prune

    drawn = []
    original = BaseModel.sample_timesteps

    def spy(self, n, generator):
        t = original(self, n, generator)
        drawn.append((self.timestep_sampling, n))
        return t

    monkeypatch.setattr(BaseModel, "sample_timesteps", spy)
    cfg = config_from_dict(tiny_config(write_sd3_model(tmp_path / "sd3"), tmp_path / "runs",
                                       model={"text_max_length": T5_LEN, "timestep_sampling": "logit_normal"},
                                       router={"num_experts": 2}, prune={"steps": 2, "warmup_steps": 1, "batch_size": 4},
                                       finetune={"steps": 1, "batch_size": 2}))
    run_prune(cfg, tmp_path / "run", progress=False)
    assert drawn == [("logit_normal", 4)] * 2  # one draw per pruning step, of the whole batch
    run_finetune(tmp_path / "run", progress=False)
    assert drawn[2:] and set(drawn[2:]) == {("logit_normal", 2)}  # each fine-tuning step (one per trained expert)


def test_sd3_export_quantizes_to_int8(sd3_run, tmp_path):
    """`aptp quantize` samples an SD3 export with the export's scheduler (and its mu under dynamic shifting) and
    writes an int8 IR the runtime serves on OpenVINO."""
    pytest.importorskip("openvino", reason='the OpenVINO backend needs openvino: pip install -e ".[openvino]"')
    pytest.importorskip("nncf", reason='aptp quantize needs nncf: pip install -e ".[quantize]"')
    from aptp_export.quantize import QuantizeOptions, quantize_export
    from engines import Runtime

    t5, out = sd3_run[0], sd3_run[3]
    if t5:
        pytest.skip("one SD3 export is enough: the one with dynamic shifting (mu)")
    opts = QuantizeOptions(prompts=PROMPTS * 2, guard_prompts=PROMPTS[::-1], per_expert=1, guard_per_expert=1,
                           steps=2, guidance=5.0, min_psnr=0.0, mean_psnr=0.0, experts=[0], threads=1,
                           progress=False, scan=False)
    quantize_export(out, tmp_path / "int8", opts, log=lambda *_: None)
    rt = Runtime.load(tmp_path / "int8")
    assert rt.manifest.experts[0].precision in ("int8", "int8_weights") and rt.manifest.scheduler.mu is not None
    image = rt.generate(PROMPTS[:1], steps=2, seed=3, expert=0)[0]
    assert image.size == (16, 16)
