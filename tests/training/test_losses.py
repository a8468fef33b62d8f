"""Losses of the pruning and fine-tuning phases."""

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    BlockRecorder,
    block_distill_loss,
    contrastive_loss,
    diffusion_loss,
    diffusion_target,
    resource_loss,
    snr_weights,
    spread_loss,
)


def _scheduler(pred="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=pred)


# ------------------------------------------------------------------------------------------ contrastive

def test_contrastive_minimum_where_arch_similarity_matches_prompt_similarity():
    g = torch.Generator().manual_seed(0)
    n, e = 24, 16
    # clustered prompts, so that the target rows are spread over each cluster (not one-hot)
    centres = torch.randn(4, e, generator=g)
    prompts = F.normalize(centres.repeat_interleave(6, 0) + 0.15 * torch.randn(n, e, generator=g), dim=-1)
    tau = 0.03
    # architecture vectors with exactly the prompts' Gram matrix (embedded in a larger space)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    matched = prompts @ q[:e]
    best = contrastive_loss(matched, prompts, tau)
    # at the match, the cross-entropy equals the targets' entropy (the global minimum)
    target = torch.softmax(prompts @ prompts.t() / tau, -1)
    entropy = -(target * target.clamp_min(1e-30).log()).sum(-1).mean()
    assert torch.allclose(best, entropy, atol=1e-4)
    # and is a stationary point
    a = matched.clone().requires_grad_(True)
    contrastive_loss(a, prompts, tau).backward()
    assert a.grad.abs().max() < 1e-3
    # any perturbation or unrelated vectors are worse
    for scale in (0.05, 0.2, 1.0):
        worse = contrastive_loss(matched + scale * torch.randn(n, 40, generator=g), prompts, tau)
        assert worse > best + 1e-3
    assert contrastive_loss(torch.randn(n, 40, generator=g), prompts, tau) > best + 0.1


def test_contrastive_gradient_pulls_similar_prompts_together():
    """Two near-identical prompts with orthogonal architectures: a gradient step raises their cosine."""
    g = torch.Generator().manual_seed(1)
    p = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    p[1] = F.normalize(p[0] + 0.01 * torch.randn(8, generator=g), dim=0)
    a = F.normalize(torch.randn(6, 32, generator=g), dim=-1).requires_grad_(True)
    cos0 = F.cosine_similarity(a[0], a[1], dim=0)
    contrastive_loss(a, p, 0.03).backward()
    with torch.no_grad():
        a2 = a - 0.05 * a.grad / a.grad.norm()
    assert F.cosine_similarity(a2[0], a2[1], dim=0) > cos0


# --------------------------------------------------------------------------------------------- resource

def test_resource_loss_log_zero_at_budget_and_symmetric_in_ratio():
    p = 0.6
    r = torch.tensor(p)
    assert resource_loss(r, p).item() == pytest.approx(0.0, abs=1e-7)
    hi, lo = resource_loss(torch.tensor(p * 1.5), p), resource_loss(torch.tensor(p / 1.5), p)
    assert hi.item() == pytest.approx(math.log(1.5), rel=1e-6) and lo.item() == pytest.approx(math.log(1.5), rel=1e-6)
    x = torch.tensor(0.9, requires_grad=True)
    resource_loss(x, p).backward()
    assert x.grad > 0  # above the budget: gradient pushes MACs down
    y = torch.tensor(0.3, requires_grad=True)
    resource_loss(y, p).backward()
    assert y.grad < 0
    assert resource_loss(torch.tensor(0.8), 0.5, "abs").item() == pytest.approx(0.3)
    assert resource_loss(torch.tensor(0.8), 0.5, "square").item() == pytest.approx(0.09)


def test_spread_terms_reward_spread_out_budgets():
    same = torch.full((8,), 0.5)
    spread = torch.linspace(0.3, 0.7, 8)
    s_std, s_max = spread_loss(spread)
    f_std, f_max = spread_loss(same)
    assert s_std < f_std and s_max < f_max
    assert f_std.item() == pytest.approx(0.0) and f_max.item() == pytest.approx(0.5)


# -------------------------------------------------------------------------------------------- diffusion

def test_targets_epsilon_and_velocity():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    sch = _scheduler("v_prediction")
    assert torch.equal(diffusion_target(sch, x0, noise, t, "epsilon"), noise)
    ac = sch.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = ac.sqrt() * noise - (1 - ac).sqrt() * x0
    assert torch.allclose(diffusion_target(sch, x0, noise, t, "v_prediction"), v, atol=1e-6)
    with pytest.raises(ValueError):
        diffusion_target(sch, x0, noise, t, "sample")


def test_min_snr_weights():
    sch = _scheduler()
    t = torch.arange(0, 1000, 37)
    ac = sch.alphas_cumprod[t]
    snr = ac / (1 - ac)
    w_eps = snr_weights(sch, t, 5.0, "epsilon")
    assert torch.allclose(w_eps, torch.clamp(snr, max=5.0) / snr, rtol=1e-5)
    assert (w_eps <= 1 + 1e-6).all() and (w_eps[snr < 5] == 1).all()
    w_v = snr_weights(sch, t, 5.0, "v_prediction")
    assert torch.allclose(w_v, torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-5)
    # weighting changes the loss only where snr > gamma
    g = torch.Generator().manual_seed(3)
    pred, tgt = torch.randn(len(t), 3, 4, 4, generator=g), torch.randn(len(t), 3, 4, 4, generator=g)
    plain = diffusion_loss(pred, tgt, t)
    weighted = diffusion_loss(pred, tgt, t, sch, 5.0, "epsilon")
    assert torch.allclose(weighted, plain * w_eps)
    assert weighted.shape == (len(t),)


# ------------------------------------------------------------------------------------------------ blocks

def test_block_recorder_and_block_loss():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=2, norm_num_groups=4).eval()
    rec = BlockRecorder(unet)
    assert rec.num_blocks == 5
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.randn(2, 4, 12)
    with torch.no_grad():
        unet(x, t, c)
    a = rec.take()
    assert len(a) == 5 and all(v.shape[0] == 2 for v in a)
    with torch.no_grad():
        unet(x, t, c)
    b = rec.take()
    assert torch.equal(block_distill_loss(a, b), torch.zeros(2))
    with torch.no_grad():
        unet(x + 0.1 * torch.randn_like(x), t, c)
    d = block_distill_loss(rec.take(), a)
    assert d.shape == (2,) and (d > 0).all()
    rec.remove()
    with torch.no_grad():
        unet(x, t, c)
    assert rec.take() == []
