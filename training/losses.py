"""Losses of the pruning and fine-tuning phases (docs/method.md §4-§5).

Per-sample losses return [B] so that a distributed step can sum them over the global batch; losses
over the global batch (resource, spread, contrastive) take gathered tensors.

- `diffusion_target` / `diffusion_loss`: the base model's parameterisation (epsilon, v, or SD3's flow
  velocity noise - x0), optional min-SNR-gamma weighting (Hang et al. 2023; for v the weight is
  min(snr, g) / (snr + 1); none for flow matching, whose schedule has no alphas).
- `BlockRecorder`: forward hooks on down blocks, mid block and up blocks; `block_distill_loss`.
- `resource_loss`: |log(r / p)| (or abs / square) of the mean MACs fraction r vs the budget p;
  `spread_loss`: the reference's -std(r) and 1 - max(r) terms over the batch.
- `contrastive_loss`: row-wise cross-entropy between softmax(A A^T / tau) (targets: softmax(P P^T / tau)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _alphas_cumprod(scheduler, t: torch.Tensor) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)
    return ac[t]


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """What the model must predict for noisy = add_noise(x0, noise, t): noise (epsilon) or velocity (v)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if prediction_type == "flow_prediction":  # rectified flow (SD3): d x_t / d sigma
        return noise - x0
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon, v_prediction or flow_prediction)")


def snr_weights(scheduler, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min-SNR-gamma loss weights [B] for timesteps t [B]."""
    ac = _alphas_cumprod(scheduler, t)
    snr = ac / (1.0 - ac).clamp(min=1e-20)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: [B, ...] x [B, ...] -> [B] (computed in float32)."""
    d = (a.float() - b.float()) ** 2
    return d.reshape(d.shape[0], -1).mean(dim=1)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, scheduler=None,
                   snr_gamma: float | None = None, prediction_type: str = "epsilon") -> torch.Tensor:
    """Per-sample diffusion loss [B]: MSE(pred, target), times min-SNR weights if `snr_gamma`."""
    loss = per_sample_mse(pred, target)
    if snr_gamma is not None and prediction_type != "flow_prediction":  # min-SNR is defined for DDPM noise
        loss = loss * snr_weights(scheduler, t, snr_gamma, prediction_type)
    return loss


class BlockRecorder:
    """Records the outputs of a UNet's down blocks, mid block and up blocks on every forward; of a diffusion
    transformer (PixArt), the output of every transformer block (a removed block records its input, which is
    then its output).

    Usage: rec = BlockRecorder(unet); unet(...); acts = rec.take()  -> list of tensors (hidden states,
    without the down blocks' residual tuples). `rec.remove()` detaches the hooks.
    """

    def __init__(self, unet: nn.Module):
        self._acts: list[torch.Tensor] = []
        self._handles = []
        if hasattr(unet, "down_blocks"):
            blocks = list(unet.down_blocks)
            if getattr(unet, "mid_block", None) is not None:
                blocks.append(unet.mid_block)
            blocks += list(unet.up_blocks)
        else:
            blocks = list(unet.transformer_blocks)
        for blk in blocks:
            self._handles.append(blk.register_forward_hook(self._hook))
        self.num_blocks = len(blocks)

    def _hook(self, module, inputs, output):
        if isinstance(output, tuple) and len(output) == 2 and hasattr(module, "context_pre_only"):
            output = output[1]  # an MMDiT block (or its skip) returns (text, image): record the image stream
        self._acts.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        acts, self._acts = self._acts, []
        return acts

    def clear(self) -> None:
        self._acts = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def block_distill_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample block distillation [B]: the mean over blocks of per-sample MSE to the (detached) teacher."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"block outputs differ in count: student {len(student)}, teacher {len(teacher)}")
    return torch.stack([per_sample_mse(s, t.detach()) for s, t in zip(student, teacher, strict=True)]).mean(0)


def resource_loss(ratio: torch.Tensor, budget: float, kind: str = "log") -> torch.Tensor:
    """Distance of the mean MACs fraction `ratio` (scalar tensor) to the budget p: |log(r/p)|, |r-p|, (r-p)^2."""
    if kind == "log":
        return torch.abs(torch.log(ratio.clamp(min=1e-12) / budget))
    if kind == "abs":
        return torch.abs(ratio - budget)
    if kind == "square":
        return (ratio - budget) ** 2
    raise ValueError(f"unknown resource loss {kind!r}")


def spread_loss(ratios: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's budget-spreading terms over per-sample MACs fractions [B]: (-std(r), 1 - max(r))."""
    std = ratios.std() if ratios.numel() > 1 else ratios.sum() * 0.0
    return -std, 1.0 - ratios.max()


def routing_loss(pred_vectors: torch.Tensor, code_vectors: torch.Tensor, assignment: torch.Tensor,
                 tau: float = 0.1) -> torch.Tensor:
    """Per-sample cross-entropy [B] of softmax(cosine(pred_vectors, code_vectors) / tau) to `assignment`.

    pred_vectors [B, D] and code_vectors [K, D] are normalised architecture vectors; the codes are
    detached (the predictor learns to point at the code optimal transport chose, as in SwAV)."""
    logits = pred_vectors @ code_vectors.detach().t() / tau
    return F.cross_entropy(logits, assignment, reduction="none")


def contrastive_loss(arch_vectors: torch.Tensor, prompt_embeddings: torch.Tensor, tau: float = 0.03,
                     prompt_tau: float | None = None) -> torch.Tensor:
    """Row-wise cross-entropy  -mean_i sum_j softmax(P P^T / tau)_ij log softmax(A A^T / tau)_ij.

    arch_vectors [N, D], prompt_embeddings [N, E]; both are L2-normalised here. The minimum over A (for
    fixed P) is reached when the architecture similarities equal the prompt similarities.
    """
    a = F.normalize(arch_vectors, dim=-1)
    p = F.normalize(prompt_embeddings.detach(), dim=-1)
    target = torch.softmax((p @ p.t()) / (prompt_tau or tau), dim=-1)
    logp = torch.log_softmax((a @ a.t()) / tau, dim=-1)
    return -(target * logp).sum(dim=-1).mean()
