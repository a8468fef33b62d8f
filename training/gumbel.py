"""Gumbel-sigmoid gates with a straight-through estimator (docs/method.md §2).

    s = sigmoid((logits + g + offset) / tau),  g = -log(-log u),  u ~ U(0, 1)
    gate = 1[s > 0.5] + s - stop_grad(s)

Forward values are exactly 0/1; gradients are those of the soft sigmoid. Without noise (evaluation)
the gate is 1[logits + offset > 0], which is what `hard_gates` returns.
"""

from __future__ import annotations

import torch


def gumbel_noise(shape, generator: torch.Generator | None = None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard Gumbel samples of `shape` (drawn from `generator`, or the global RNG if None)."""
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))


def gumbel_sigmoid(logits: torch.Tensor, tau: float = 0.4, offset: float = 3.0,
                   noise: torch.Tensor | None = None, hard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates from logits [..., D].

    Args: noise: Gumbel noise of logits' shape (None = no noise, evaluation); hard: straight-through 0/1.
    Returns (gates, soft): gates are 0/1 in the forward pass with the soft gradient when `hard`; soft is
    the sigmoid itself.
    """
    z = logits + offset if noise is None else logits + noise + offset
    soft = torch.sigmoid(z / tau)
    if not hard:
        return soft, soft
    hard_v = (z > 0).to(soft.dtype)  # == (soft > 0.5), without the rounding of the sigmoid
    return hard_v + (soft - soft.detach()), soft  # parenthesised: forward value exactly 0/1


def hard_gates(logits: torch.Tensor, offset: float = 3.0) -> torch.Tensor:
    """Noise-free binary gates 1[logits + offset > 0] (inference; no gradient)."""
    return (logits.detach() + offset > 0).to(torch.float32)


def keep_min_units(gates: torch.Tensor, soft: torch.Tensor, group_slices: list[tuple[int, int]],
                   min_units: int = 1) -> torch.Tensor:
    """Force each width group of straight-through `gates` [..., D] to keep >= `min_units` units.

    Where a group keeps fewer, the units with the largest soft value are switched on (the forward value
    becomes 1, the gradient stays the soft one). Groups with fewer units than `min_units` keep all.
    """
    if min_units <= 0 or not group_slices:
        return gates
    hard = gates.detach()
    add = torch.zeros_like(hard)
    for start, stop in group_slices:
        n = stop - start
        k = min(min_units, n)
        kept = hard[..., start:stop].sum(-1, keepdim=True)
        short = kept < k
        if not bool(short.any()):
            continue
        top = soft.detach()[..., start:stop].topk(k, dim=-1).indices
        want = torch.zeros_like(hard[..., start:stop]).scatter_(-1, top, 1.0)
        fill = torch.clamp(want - hard[..., start:stop], min=0) * short.to(hard.dtype)
        add[..., start:stop] = fill
    return gates + add
