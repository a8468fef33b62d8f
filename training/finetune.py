"""The fine-tuning phase (docs/method.md §5): one physically pruned expert per architecture code.

    summary = run_finetune(run_dir, resume=False)

1. route the training set with the trained router (noise-free cosine argmax);
2. for each code: binarise, `space.materialize` the dense UNet (the expert inherits every kept weight),
   fine-tune it on its routed samples with  w_ddpm L_ddpm + w_out L_out + w_block L_block  against the
   dense teacher (the untouched base UNet), and `save_expert` it to RUN/experts/expert_XX/.
With several processes (`accelerate launch`), process r fine-tunes experts r, r+P, ... independently.
`--resume` skips experts whose directory is complete. Steps per expert: `finetune.steps` each
(allocation "per_expert", as the paper) or `finetune.steps` in total shared by routed samples ("split").
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from aptp_export.expert_io import save_expert
from engines.errors import UserError
from engines.fileio import write_json

from .data import collate
from .distributed import Dist
from .losses import BlockRecorder, block_distill_loss, diffusion_loss, diffusion_target, per_sample_mse
from .prune import build_setup
from .router import Router
from .rundir import RunDir

log = logging.getLogger("aptp.finetune")


def steps_per_expert(counts: list[int], steps: int, allocation: str) -> list[int]:
    """Fine-tuning steps of each expert: `steps` each, or `steps` split in proportion to `counts`
    (largest remainders; an expert with no samples gets none)."""
    if allocation == "per_expert":
        return [steps if c > 0 else 0 for c in counts]
    total = sum(counts)
    if total == 0:
        return [0] * len(counts)
    raw = [steps * c / total for c in counts]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: steps - sum(out)]:
        out[i] += 1
    return out


def lr_factor(step: int, steps: int, warmup: int, schedule: str = "constant") -> float:
    """Linear warm-up over `warmup` steps, then 1 (constant) or a cosine to 0 at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        span = max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup + 1) / span)))
    return 1.0


def finetune_expert(expert: torch.nn.Module, teacher: torch.nn.Module, base, dataset, indices: torch.Tensor,
                    steps: int, fcfg, seed: int, progress: bool = True, desc: str = "expert",
                    row_gates=None, count_by: torch.Tensor | None = None) -> dict:
    """Fine-tune `expert` in place on dataset rows `indices` for `steps` steps against `teacher`.

    Batches are drawn from a permutation of `indices` per epoch (seeded), batch size
    min(fcfg.batch_size, len(indices)). `row_gates` = (space, gates [len(dataset), D]): `expert` is the
    dense UNet and each sample runs gated by its row's gates (shared-weight fine-tuning). `count_by`:
    int64 label per dataset row; the result then has "samples_by_label" (how many samples of each label
    the steps drew). Returns {"steps", "loss_first", "loss_last"}.
    """

    lw = fcfg.losses
    dev = next(expert.parameters()).device
    expert.train().requires_grad_(True)
    teacher.eval().requires_grad_(False)
    params = [p for p in expert.parameters() if p.requires_grad]
    lr = fcfg.lr * (math.sqrt(fcfg.batch_size) if fcfg.scale_lr else 1.0)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=fcfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    rec_s, rec_t = BlockRecorder(expert), BlockRecorder(teacher)
    n = len(indices)
    bs = min(fcfg.batch_size, n)
    per_epoch = n // bs
    perm, epoch = None, -1
    c, h, w = base.latent_shape()
    hist = []
    drawn = torch.zeros(int(count_by.max()) + 1 if count_by is not None else 0, dtype=torch.long)
    try:
        for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            e, j = divmod(step, per_epoch)
            if e != epoch:
                perm, epoch = indices[torch.randperm(n, generator=gen)], e
            idx = perm[j * bs:(j + 1) * bs]
            if count_by is not None:
                drawn += torch.bincount(count_by[idx], minlength=len(drawn))
            pixels, captions, sizes = collate(dataset, idx, sizes=True)
            drop = torch.rand(bs, generator=gen) < fcfg.caption_dropout
            captions = ["" if d else cap for d, cap in zip(drop.tolist(), captions, strict=True)]
            t = base.sample_timesteps(bs, gen).to(dev)
            noise = torch.randn((bs, c, h, w), generator=gen).to(dev)
            eps = torch.randn((bs, base.latent_channels, h, w), generator=gen).to(dev) if base.vae is not None else None
            x0 = base.encode_images(pixels.to(dev), eps)
            cond = base.conditioning(captions, sizes)
            noisy = base.scheduler.add_noise(x0, noise, t)
            rec_s.clear(), rec_t.clear()
            with torch.no_grad():
                t_out = cond.predict(teacher, noisy, t)
            if row_gates is None:
                out = cond.predict(expert, noisy, t)
            else:
                with row_gates[0].gated(expert, row_gates[1][idx].to(dev)):
                    out = cond.predict(expert, noisy, t)
            l_ddpm = diffusion_loss(out, diffusion_target(base.scheduler, x0, noise, t, base.prediction_type), t,
                                    base.scheduler, lw.snr_gamma, base.prediction_type).mean()
            l_out = per_sample_mse(out, t_out).mean()
            l_block = block_distill_loss(rec_s.take(), rec_t.take()).mean()
            loss = lw.ddpm * l_ddpm + lw.distill_out * l_out + lw.distill_block * l_block
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, steps, fcfg.lr_warmup_steps, fcfg.lr_schedule)
            opt.step()
            hist.append(float(loss.detach()))
    finally:
        rec_s.remove(), rec_t.remove()
    expert.eval().requires_grad_(False)
    k = max(1, min(10, len(hist)))
    res = {"steps": steps, "loss_first": sum(hist[:k]) / k if hist else None,
           "loss_last": sum(hist[-k:]) / k if hist else None}
    if count_by is not None:
        res["samples_by_label"] = drawn.tolist()
    return res


def _finetune_shared(setup, gates: torch.Tensor, assignment: torch.Tensor, fc, seed: int, progress: bool) -> dict:
    """Shared-weight fine-tuning (beyond the paper): one copy of the dense UNet, each training sample run
    gated by its routed expert's gates, `fc.steps` steps over all samples; every shared weight learns from
    every prompt. The experts are then cut from these weights. Returns {"unet", "result"}."""
    t0 = time.time()
    student = copy.deepcopy(setup.base.unet)
    rows = torch.arange(len(setup.dataset))
    res = finetune_expert(student, setup.base.unet, setup.base, setup.dataset, rows, fc.steps, fc, seed=seed * 1000,
                          progress=progress, desc="shared-weight fine-tuning",
                          row_gates=(setup.space, gates[assignment]), count_by=assignment)
    res["samples_by_label"] += [0] * (gates.shape[0] - len(res["samples_by_label"]))
    res["seconds"] = round(time.time() - t0, 1)
    return {"unet": student.eval().requires_grad_(False), "result": res}


def run_finetune(run_dir: str | Path, resume: bool = False, progress: bool = True,
                 experts: list[int] | None = None) -> dict:
    """Fine-tune every expert of a pruned run (RUN/prune must exist). Returns RUN/experts/experts.json's content."""

    run = RunDir(run_dir)
    run.require_pruned()
    run_dir = run.root
    cfg = run.config()
    dist = Dist.init()
    torch.manual_seed(cfg.seed)
    setup = build_setup(cfg, run_dir, dist, progress=progress)
    router = Router.load(run.prune_dir).to(dist.device)
    if router.layout.num_units != setup.layout.num_units:
        raise UserError(f"{run_dir}/prune: router has {router.layout.num_units} units, the model's space "
                        f"{setup.layout.num_units}; was the model changed?")
    assignment = router.route(setup.embeddings).cpu()
    k_all = router.num_experts
    counts = torch.bincount(assignment, minlength=k_all).tolist()
    fc = cfg.finetune
    steps = steps_per_expert(counts, fc.steps, fc.allocation)
    gates = router.expert_gates().cpu()
    macs = setup.macs_fraction(gates).detach().cpu().reshape(-1).tolist()
    todo = list(range(k_all)) if experts is None else list(experts)
    mine = [k for k in todo if k % dist.world_size == dist.rank]
    results = {}
    shared = None
    if fc.weights == "shared":
        mine = [] if not dist.is_main else todo
        if dist.world_size > 1:
            log.warning("finetune.weights = shared trains on the main process only")
        if any(not (run.expert(k) / "model.safetensors").is_file() for k in mine) or not resume:
            shared = _finetune_shared(setup, gates, assignment, fc, cfg.seed, progress and dist.is_main)
    for k in mine:
        out = run.expert(k)
        if (out / "arch.json").is_file() and (out / "model.safetensors").is_file():
            if resume:
                log.info("expert %d: already fine-tuned, skipped", k)
                continue
            raise UserError(f"{out} already exists; pass --resume to keep finished experts")
        t0 = time.time()
        if shared is not None:  # cut from the jointly fine-tuned weights
            expert = setup.space.materialize(shared["unet"], gates[k])
            res = {**shared["result"], "weights": "shared", "sample_steps": shared["result"]["samples_by_label"][k]}
            res.pop("samples_by_label")
            save_expert(out, setup.space, gates[k], expert)
            results[k] = res
            write_json(out / "finetune.json", res)
            continue
        expert = setup.space.materialize(setup.base.unet, gates[k])
        idx = (assignment == k).nonzero().flatten()
        if steps[k] > 0:
            res = finetune_expert(expert, setup.base.unet, setup.base, setup.dataset, idx, steps[k], fc,
                                  seed=cfg.seed * 1000 + k, progress=progress and dist.is_main,
                                  desc=f"expert {k:02d} ({len(idx)} samples)")
        else:
            log.warning("expert %d: no routed training samples; saved without fine-tuning", k)
            res = {"steps": 0, "loss_first": None, "loss_last": None}
        save_expert(out, setup.space, gates[k], expert)
        res.update({"seconds": round(time.time() - t0, 1)})
        results[k] = res
        write_json(out / "finetune.json", res)
    dist.barrier()
    summary = {"experts": []}
    for k in range(k_all):
        f = run.expert(k) / "finetune.json"
        r = json.loads(f.read_text()) if f.is_file() else {}
        summary["experts"].append({"id": k, "dir": str(run.expert(k).relative_to(run.root)), "macs_fraction": macs[k],
                                   "train_samples": counts[k], "train_share": counts[k] / len(assignment),
                                   **r})
    if dist.is_main:
        write_json(run.experts_summary, summary)
    return summary
