"""Stable Diffusion 3 (issue 25) training path on a tiny random SD3 pipeline: the conditioning equals
StableDiffusion3Pipeline.encode_prompt (CLIP-L + CLIP-G + T5 context, pooled projection; zeros without T5), the
flow-matching objective is diffusers' (noisy sample = FlowMatchEulerDiscreteScheduler.scale_noise, velocity
target, model timestep 1000 sigma), and `aptp prune` -> `finetune` run on the MMDiT; the export refuses the
family it cannot serve yet."""

from __future__ import annotations

import pytest
import torch
from prune_fixtures import tiny_config, write_sd3_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

PROMPTS = ["a red circle", "the small blue square above a big green circle"]


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


def test_sd3_prune_finetune_and_the_export_refusal(tmp_path):
    from diffusers import SD3Transformer2DModel

    from aptp_export import ArchSpace
    from aptp_export.expert_io import load_expert, read_expert_info
    from engines.errors import UserError
    from training.config import config_from_dict
    from training.export_run import export_run
    from training.finetune import run_finetune
    from training.prune import run_prune
    from training.rundir import RunDir

    model = write_sd3_model(tmp_path / "sd3", seed=2)
    cfg = config_from_dict(tiny_config(model, tmp_path / "runs", model={"text_max_length": 12},
                                       router={"num_experts": 2},
                                       prune={"steps": 3, "warmup_steps": 1, "batch_size": 4},
                                       finetune={"steps": 2, "batch_size": 2}))
    run = tmp_path / "run"
    summary = run_prune(cfg, run, progress=False)
    run_finetune(run, progress=False)
    assert len(summary["expert_macs"]) == 2 and all(0.0 < m <= 1.0 for m in summary["expert_macs"])
    base = _base(model, tmp_path)
    space = ArchSpace.from_unet(base.unet)
    cond = base.conditioning(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([30, 700])
    for k in range(2):
        expert = load_expert(RunDir(run).expert(k))
        _, arch, _ = read_expert_info(RunDir(run).expert(k))
        assert isinstance(expert, SD3Transformer2DModel)
        assert sum(p.numel() for p in expert.parameters()) == sum(
            p.numel() for p in space.materialize(base.unet, arch).parameters())
        with torch.no_grad():
            out = cond.predict(expert, x, t)
        assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(UserError, match="sd3 model is not implemented yet"):
        export_run(run, tmp_path / "export", progress=False)
