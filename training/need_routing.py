"""Routing by measured need (beyond the paper): after the pruning phase, teach the router which expert
each prompt needs, measured, instead of which code its architecture vector happens to resemble.

    labels = need_labels(setup, router, rows)            # equipartitioned OT on per-prompt code errors
    fit_predictor_(router, setup.embeddings[rows], labels)

Why: in the paper's pruning phase the predictor learns only from the contrastive and routing losses once
routing starts; nothing tells it that a prompt suffers more from a small expert. Measured on the toy
(docs/results/toy_promise.md): the router grouped prompts by colour words, hard and easy prompts got
the same mean MACs (0.492 / 0.492), and the mixture lost to one static model at equal MACs.

1. `need_errors`: every code's expert (binary, noise-free, materialised) on `rows` of the training set at
   fixed timesteps and noise; E[n, k] = MSE of code k's output to the dense teacher's.
2. `need_labels`: the equipartitioned optimal assignment of E (each expert gets ~N/K prompts, so the mean
   MACs stay the mean of the codes' MACs and no expert takes more than its share): it minimises the total
   error, which sends the prompts that lose most when pruned to the experts that keep most.
3. `fit_predictor_`: the predictor (codes frozen) is trained to point at those labels with the routing
   loss (cross-entropy of cosine scores / tau, straight-through gates); `Router.calibrate_` then balances
   inference's argmax. The exported router keeps its format: cosine to the same codes.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from .data import collate
from .losses import routing_loss

log = logging.getLogger("aptp.need")

TIMESTEPS = (200, 500, 800)


@torch.no_grad()
def need_errors(setup, router, rows: torch.Tensor, timesteps=TIMESTEPS, seed: int = 0, batch_size: int = 32,
                progress: bool = True) -> torch.Tensor:
    """E [N, K]: mean over `timesteps` of the MSE of each code-gated UNet's output to the dense output,
    for training rows `rows` (same noise for every code)."""
    base, space, unet = setup.base, setup.space, setup.base.unet
    gates = router.expert_gates().to(setup.dist.device)
    k = gates.shape[0]
    # the physically pruned experts compute what the gated UNet computes (exact to float32 rounding), at
    # their own MACs instead of the dense network's
    experts = [space.materialize(unet, gates[j]).eval() for j in range(k)]
    gen = torch.Generator().manual_seed(seed)
    c, h, w = base.latent_shape()
    err = torch.zeros(len(rows), k, dtype=torch.float64)
    for start in tqdm(range(0, len(rows), batch_size), desc="need: code errors", disable=not progress):
        idx = rows[start:start + batch_size]
        pixels, captions, sizes = collate(setup.dataset, idx, sizes=True)
        eps = torch.randn((len(idx), base.latent_channels, h, w), generator=gen) if base.vae is not None else None
        x0 = base.encode_images(pixels.to(setup.dist.device), eps)
        cond = base.conditioning(captions, sizes)
        for tv in timesteps:
            noise = torch.randn((len(idx), c, h, w), generator=gen).to(x0.device)
            t = torch.full((len(idx),), int(tv), dtype=torch.long, device=x0.device)
            noisy = base.scheduler.add_noise(x0, noise, t)
            ref = cond.predict(unet, noisy, t)
            for j in range(k):
                out = cond.predict(experts[j], noisy, t)
                err[start:start + len(idx), j] += ((out - ref) ** 2).flatten(1).mean(1).double().cpu() / len(timesteps)
    return err


def need_labels(err: torch.Tensor) -> torch.Tensor:
    """Equipartitioned assignment int64 [N] minimising the total of err [N, K]: each expert takes N // K or
    N // K + 1 prompts (exact: a linear assignment over the experts' replicated slots, scipy's LAPJV).
    Adding a constant to a row changes nothing, so only how much more a prompt loses on one expert than on
    another decides where it goes."""
    from scipy.optimize import linear_sum_assignment

    e = err.detach().to(torch.float64).cpu().numpy()
    n, k = e.shape
    slots = np.repeat(np.arange(k), -(-n // k))  # ceil(n / k) slots per expert
    rows, cols = linear_sum_assignment(e[:, slots])
    out = np.empty(n, dtype=np.int64)
    out[rows] = slots[cols]
    return torch.from_numpy(out)


def fit_predictor_(router, z: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 0.01,
                   tau: float = 0.1, batch_size: int = 256, seed: int = 0, progress: bool = True) -> dict:
    """Train the predictor (codes frozen) so the cosine scores of prompt embeddings z [N, E] pick `labels`
    [N]. Returns {"loss_first", "loss_last", "train_agreement"} (agreement of the noise-free argmax)."""
    code_vec = router.code_vectors().detach()
    params = [router.predictor.weight, router.predictor.bias]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    hist = []
    for _ in tqdm(range(steps), desc="need: fit the router", disable=not progress):
        idx = torch.randint(0, len(z), (min(batch_size, len(z)),), generator=gen)
        vec = router.arch_vectors(router.gates(router.predict(z[idx]), None))
        loss = routing_loss(vec, code_vec, labels[idx].to(vec.device), tau).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(float(loss.detach()))
    router.zero_grad(set_to_none=True)
    with torch.no_grad():
        agree = float((router.route(z).cpu() == labels.cpu()).double().mean())
    k = max(1, min(10, len(hist)))
    return {"loss_first": sum(hist[:k]) / k, "loss_last": sum(hist[-k:]) / k, "train_agreement": agree}


def refit_to_need_(setup, router, num_prompts: int, steps: int, seed: int = 0, progress: bool = True) -> dict:
    """Measure the codes' per-prompt errors on `num_prompts` training rows, label by OT, fit the predictor.
    Returns a summary (labels' shares and the experts' mean error per label for the run's summary)."""
    n = len(setup.dataset)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=g)[: min(n, num_prompts)]
    err = need_errors(setup, router, rows, seed=seed, progress=progress)
    labels = need_labels(err)
    z = setup.embeddings[rows.to(setup.embeddings.device)]
    fit = fit_predictor_(router, z, labels, steps=steps, seed=seed, progress=progress)
    k = router.num_experts
    shares = (torch.bincount(labels, minlength=k).double() / len(labels)).tolist()
    chosen = err[torch.arange(len(labels)), labels].mean()
    log.info("need routing: labels' error %.5f (nearest-size codes %.5f), router agrees on %.0f%% of %d prompts",
             float(chosen), float(err.mean()), 100 * fit["train_agreement"], len(rows))
    return {"prompts": len(rows), "label_shares": shares, "label_error": float(chosen),
            "mean_code_error": err.mean(0).tolist(), **fit}
