"""Sinkhorn-Knopp optimal transport with equipartition (docs/method.md §3; Cuturi 2013, SwAV).

Given similarities S [B, K] of B samples to K codes, find Q = diag(u) exp(S / eps) diag(v) whose rows
(samples) each sum to 1 and whose columns (codes) each receive B / K, by alternate renormalisation.
With several processes each holds a slice of the rows; only the per-code column sums and the total
need to be summed across processes (`all_reduce_sum`), so every process gets its rows of the same Q as
a single process holding the whole global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
             all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Transport plan for local rows `scores` [B_local, K] (cosine similarities in [-1, 1]).

    Args: epsilon: entropic regularisation (small = near one-hot rows); iterations: Sinkhorn sweeps;
    all_reduce_sum: sums a tensor over processes (None = this process holds the whole batch).
    Returns Q [B_local, K] in float64, each row summing to 1; the columns over the global batch sum to
    about B_global / K (exactly in the limit of many iterations).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, K], got shape {tuple(scores.shape)}")
    reduce = all_reduce_sum or (lambda t: t)
    s = scores.detach().to(torch.float64)
    # cosine <= 1, so exp((S - 1) / eps) <= 1: stable without a max-reduction across processes
    q = torch.exp((s - 1.0) / epsilon)
    k = q.shape[1]
    b = reduce(torch.tensor([float(q.shape[0])], dtype=torch.float64, device=q.device))
    q = q / reduce(q.sum().reshape(1))
    for _ in range(iterations):
        col = reduce(q.sum(dim=0))          # mass per code over the global batch
        q = q / col.clamp(min=1e-300) / k   # each code gets 1/K
        row = q.sum(dim=1, keepdim=True)    # mass per sample (local)
        q = q / row.clamp(min=1e-300) / b   # each sample gets 1/B
    return q * b


def assign(scores: torch.Tensor, optimal_transport: bool = True, epsilon: float = 0.05, iterations: int = 3,
           all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
           tie_break: torch.Tensor | None = None) -> torch.Tensor:
    """Code index per row of `scores` [B_local, K]: argmax of the Sinkhorn plan, or of the scores
    themselves when `optimal_transport` is False. Returns int64 [B_local].

    tie_break: optional U(0,1) [B_local, K]; exact ties (identical codes, as right after initialisation,
    when every gate of every code is open) are then broken at random instead of always towards the
    lowest index, which would send the whole batch to code 0. It moves values by 1e-9 relative only.
    """
    q = sinkhorn(scores, epsilon, iterations, all_reduce_sum) if optimal_transport else scores.detach().double()
    if tie_break is not None:
        q = q + 1e-9 * q.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) * tie_break.to(q)
    return q.argmax(dim=1)


@torch.no_grad()
def balancing_bias(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 500) -> torch.Tensor:
    """Per-code offsets b [K] such that argmax_k(scores[i, k] + b[k]) is the equipartitioned optimal
    transport assignment of the rows of `scores` [N, K] (run to convergence, in the log domain).

    The plan is Q = diag(u) exp(S / eps) diag(v); a row's argmax is argmax_k(S_k / eps + log v_k), so
    b = eps * log v extends the balanced assignment of a reference set (the training prompts) to new
    prompts one at a time. Returns float32, shifted to mean 0.
    """
    s = scores.detach().to(torch.float64) / epsilon
    n, k = s.shape
    log_v = torch.zeros(k, dtype=torch.float64, device=s.device)
    log_r, log_c = -torch.log(torch.tensor(float(n), dtype=torch.float64)), -torch.log(torch.tensor(float(k), dtype=torch.float64))
    for _ in range(iterations):
        log_u = log_r - torch.logsumexp(s + log_v, dim=1)
        log_v = log_c - torch.logsumexp(s + log_u[:, None], dim=0)
    b = epsilon * log_v
    return (b - b.mean()).to(torch.float32)
