"""Held-out evaluation of a pruned run: how prompts are routed and how far the experts are from the teacher.

    ev = RunEvaluator(run_dir)                       # loads config, base model, space, router
    ev.routing(captions, groups=difficulties)       # shares, experts' MACs, mean MACs (per group too)
    ev.distill_error(experts, assignment, dataset)  # mean MSE of routed experts' outputs to the dense teacher

The distillation error uses fixed noise and timesteps (seeded), identical for every model compared, so
two runs' figures are paired.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from aptp_export.arch_space import ArchSpace
from aptp_export.expert_io import load_expert

from .base_model import load_base_model
from .data import collate
from .embeddings import prompt_embeddings
from .router import Router
from .rundir import RunDir


@torch.no_grad()
def distill_error(experts: dict[int, torch.nn.Module], assignment: torch.Tensor, teacher: torch.nn.Module, base,
                  dataset, timesteps: tuple[int, ...] = (100, 300, 500, 700, 900), seed: int = 0,
                  batch_size: int = 50, progress: bool = False) -> dict:
    """Mean squared error between each sample's routed expert and the teacher, over samples x `timesteps`.

    experts: expert id -> model; assignment: int64 [N] expert id per dataset row. Returns {"mse": float,
    "per_expert": {id: float}, "per_timestep": {t: float}}.
    """

    n = len(dataset)
    gen = torch.Generator().manual_seed(seed)
    c, h, w = base.latent_shape()
    sums = torch.zeros(n, len(timesteps), dtype=torch.float64)
    for start in tqdm(range(0, n, batch_size), desc="held-out distillation error", disable=not progress):
        idx = torch.arange(start, min(n, start + batch_size))
        pixels, captions, sizes = collate(dataset, idx, sizes=True)
        eps = torch.randn((len(idx), base.latent_channels, h, w), generator=gen) if base.vae is not None else None
        x0 = base.encode_images(pixels, eps)
        cond = base.conditioning(captions, sizes)
        for j, tv in enumerate(timesteps):
            noise = torch.randn((len(idx), c, h, w), generator=gen)
            t = torch.full((len(idx),), int(tv), dtype=torch.long)
            noisy = base.scheduler.add_noise(x0, noise, t)
            ref = cond.predict(teacher, noisy, t)
            a = assignment[idx]
            for k in a.unique().tolist():
                m = a == k
                out = cond[m].predict(experts[k], noisy[m], t[m])
                sums[idx[m], j] = ((out - ref[m]) ** 2).flatten(1).mean(1).double()
    per_expert = {int(k): float(sums[assignment == k].mean()) for k in assignment.unique().tolist()}
    return {"mse": float(sums.mean()), "per_expert": per_expert,
            "per_timestep": {int(tv): float(sums[:, j].mean()) for j, tv in enumerate(timesteps)}}


class RunEvaluator:
    """Loads what a run's evaluation needs once (base model, space, router of RUN/prune)."""

    def __init__(self, run_dir: str | Path):
        self.run = RunDir(run_dir)
        self.run_dir = self.run.root
        self.cfg = self.run.config()
        self.base = load_base_model(self.cfg.model)
        self.space = ArchSpace.from_unet(self.base.unet, depth_blocks=self.cfg.model.depth_blocks)
        self.router = Router.load(self.run.prune_dir)
        s = self.base.sample_size
        self.macs_kwargs = {"height": s, "width": s, "text_len": self.base.text_len}
        self.dense_macs = float(self.space.dense_macs(**self.macs_kwargs))

    def embeddings(self, captions: list[str]) -> torch.Tensor:
        cache = Path(self.cfg.data.embedding_cache) if self.cfg.data.embedding_cache else self.run_dir / "cache"
        return prompt_embeddings(captions, cache, self.cfg.router.sentence_encoder)

    def expert_macs(self) -> torch.Tensor:
        """MACs fraction of each expert's binary architecture: float [K]."""
        gates = self.router.expert_gates()
        return torch.tensor([float(self.space.macs(g, **self.macs_kwargs)) / self.dense_macs for g in gates])

    @torch.no_grad()
    def routing(self, captions: list[str], groups: list[str] | None = None) -> dict:
        """Inference routing of `captions`: shares, max share, experts' MACs, mean MACs (and per group)."""
        a = self.router.route(self.embeddings(captions))
        macs = self.expert_macs()
        k = self.router.num_experts
        counts = torch.bincount(a, minlength=k)
        out = {"num_prompts": len(captions), "shares": (counts.double() / len(captions)).tolist(),
               "max_share": float(counts.max()) / len(captions), "expert_macs": macs.tolist(),
               "mean_macs": float(macs[a].double().mean()), "assignment": a}
        if groups is not None:
            out["groups"] = {}
            for name in sorted(set(groups)):
                m = torch.tensor([g == name for g in groups])
                out["groups"][name] = {"count": int(m.sum()), "mean_macs": float(macs[a[m]].double().mean()),
                                       "shares": (torch.bincount(a[m], minlength=k).double() / m.sum()).tolist()}
        return out

    def materialized_experts(self) -> dict[int, torch.nn.Module]:
        """Experts cut from the dense weights, before fine-tuning."""
        gates = self.router.expert_gates()
        return {k: self.space.materialize(self.base.unet, gates[k]).eval() for k in range(self.router.num_experts)}

    def finetuned_experts(self) -> dict[int, torch.nn.Module]:
        return {k: load_expert(self.run.expert(k)).eval()
                for k in range(self.router.num_experts)}
