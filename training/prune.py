"""The pruning phase (docs/method.md §4): train the prompt router and K architecture codes on a frozen UNet.

    summary = run_prune(cfg, run_dir, resume=False)

Step by step (global batch B split over P processes, every random number drawn for the whole global
batch from one generator shared by all processes, so P processes follow the 1-process run):
1. prompt embeddings z (cached) -> predictor logits -> Gumbel-sigmoid gates (straight-through);
2. warm-up (`prune.warmup_steps`): each sample gates the UNet with its own predicted vector;
   afterwards: cosine similarities of the normalised architecture vectors to the K codes' vectors,
   Sinkhorn-Knopp over the global batch (or plain argmax when `router.optimal_transport` is off), and
   each sample is gated by its code's Gumbel-sigmoid gates;
3. dense teacher = the same UNet outside `space.gated`; losses: diffusion (base parameterisation,
   min-SNR), output and block distillation, resource (|log(r/p)| on analytic MACs) + spread terms,
   contrastive on the global batch;
4. gradients summed over processes; AdamW; checkpoints every `prune.checkpoint_every` steps.
Writes RUN/config.yaml, RUN/prune/{router.safetensors, codes.safetensors, router.json, log.jsonl,
summary.json} and RUN/prune/checkpoints/.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from aptp_export.arch_space import ArchSpace
from engines.errors import UserError
from engines.fileio import write_json, write_text

from .base_model import detect_layout, load_base_model, resolve_model_path
from .checkpoint import (
    generator_state,
    load_latest,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
    set_generator_state,
)
from .config import RunConfig, diff_configs, save_config
from .data import GlobalBatches, build_dataset, check_data_source, collate, flip_sizes, local_slice
from .distributed import Dist
from .embeddings import prompt_embeddings
from .gumbel import gumbel_noise
from .losses import (
    BlockRecorder,
    block_distill_loss,
    contrastive_loss,
    diffusion_loss,
    diffusion_target,
    per_sample_mse,
    resource_loss,
    routing_loss,
    spread_loss,
)
from .need_routing import refit_to_need_
from .router import ArchLayout, Router
from .rundir import RunDir
from .sinkhorn import assign

log = logging.getLogger("aptp.prune")

# keys that may change between a run and its resumption
RESUMABLE_KEYS = {"prune.steps", "prune.checkpoint_every", "prune.log_every", "runs_dir"}


@dataclass
class Setup:
    """Everything a phase needs, built once from a config."""

    cfg: RunConfig
    dist: Dist
    base: object
    space: object
    layout: ArchLayout
    dataset: object
    embeddings: torch.Tensor
    dense_macs: float

    def macs_kwargs(self) -> dict:
        s = self.base.sample_size
        return {"height": s, "width": s, "text_len": self.base.text_len}

    def macs_fraction(self, gates: torch.Tensor) -> torch.Tensor:
        """Differentiable MACs / dense MACs of gates [D] or [N, D]."""
        return self.space.macs(gates, **self.macs_kwargs()) / self.dense_macs


def build_setup(cfg: RunConfig, run_dir: Path, dist: Dist | None = None, progress: bool = True) -> Setup:
    dist = dist or Dist.init()
    base = load_base_model(cfg.model, device=dist.device)
    space = ArchSpace.from_unet(base.unet, depth_blocks=cfg.model.depth_blocks)
    layout = ArchLayout.from_space(space)
    dataset = build_dataset(cfg.data, base.image_size)
    cache = Path(cfg.data.embedding_cache) if cfg.data.embedding_cache else run_dir / "cache"
    # the main process fills the cache first; the others then read it
    if dist.is_main:
        emb = prompt_embeddings(dataset.captions, cache, cfg.router.sentence_encoder, progress=progress)
    dist.barrier()
    if not dist.is_main:
        emb = prompt_embeddings(dataset.captions, cache, cfg.router.sentence_encoder, write=False)
    s = base.sample_size
    dense = float(space.dense_macs(height=s, width=s, text_len=base.text_len))
    return Setup(cfg, dist, base, space, layout, dataset, emb.to(dist.device), dense)


def make_router(setup: Setup) -> Router:
    rc = setup.cfg.router
    return Router(setup.layout, setup.embeddings.shape[1], rc.num_experts, rc.gumbel_tau, rc.gumbel_offset,
                  rc.min_width_units, seed=setup.cfg.seed).to(setup.dist.device)


def lr_factor(step: int, warmup: int) -> float:
    """Constant learning rate after a linear warm-up of `warmup` steps."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


class PruneTrainer:
    """The pruning loop; `run()` trains from the current step to `cfg.prune.steps`."""

    def __init__(self, setup: Setup, run_dir: Path, progress: bool = True):
        self.s = setup
        self.cfg = setup.cfg
        run = RunDir(run_dir)
        self.run_dir = run.root
        self.out_dir = run.prune_dir
        self.ckpt_dir = run.checkpoints
        self.progress = progress
        self.dist = setup.dist
        pc = self.cfg.prune
        if pc.batch_size % self.dist.world_size:
            raise UserError(f"prune.batch_size {pc.batch_size} must be divisible by the {self.dist.world_size} processes")

        self.batches = GlobalBatches(len(setup.dataset), pc.batch_size, seed=self.cfg.seed)
        self.router = make_router(setup)
        self.unet = setup.base.unet
        self.named = {"router.predictor.weight": self.router.predictor.weight,
                      "router.predictor.bias": self.router.predictor.bias,
                      "router.codes": self.router.codes}
        scale = math.sqrt(pc.batch_size) if pc.scale_lr else 1.0  # the reference's square-root scaling rule
        lr = pc.lr * scale
        codes_lr = pc.codes_lr * scale if pc.codes_lr else lr
        groups = [{"params": [self.router.predictor.weight, self.router.predictor.bias], "lr": lr, "name": "predictor"},
                  {"params": [self.router.codes], "lr": codes_lr, "name": "codes"}]
        if pc.train_unet:
            self.unet.requires_grad_(True)
            unet_params = [p for p in self.unet.parameters()]
            for n, p in self.unet.named_parameters():
                self.named[f"unet.{n}"] = p
            groups.append({"params": unet_params, "lr": pc.unet_lr, "name": "unet"})
        for g in groups:
            g["base_lr"] = g["lr"]
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=pc.weight_decay)
        self.param_names = {id(p): n for n, p in self.named.items()}
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.step = 0
        self.recorder = BlockRecorder(self.unet)
        self.writer = None

    # --- state ---------------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict, dict]:
        tensors = {n: p.detach() for n, p in self.named.items()}
        opt_t, opt_meta = optimizer_to_tensors(self.opt, self.param_names)
        tensors.update(opt_t)
        tensors["rng.shared"] = generator_state(self.gen)
        tensors["rng.torch"] = torch.get_rng_state()
        state = {"step": self.step, "optimizer": opt_meta, "config": self.cfg.to_dict(),
                 "world_size": self.dist.world_size}
        return tensors, state

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            tensors, state = self.state_tensors()
            save_checkpoint(self.ckpt_dir, self.step, tensors, state)
        self.dist.barrier()

    def load_checkpoint(self) -> bool:
        got = load_latest(self.ckpt_dir)
        if got is None:
            return False
        tensors, state = got
        with torch.no_grad():
            for n, p in self.named.items():
                if n not in tensors:
                    raise UserError(f"checkpoint in {self.ckpt_dir} lacks {n} (was prune.train_unet changed?)")
                p.copy_(tensors[n])
        optimizer_from_tensors(self.opt, self.param_names, tensors, state["optimizer"])
        set_generator_state(self.gen, tensors["rng.shared"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(state["step"])
        if self.dist.is_main:
            self._truncate_log()
        return True

    def _truncate_log(self) -> None:
        """Drop log lines after the checkpoint (and a line cut by a kill), so the log reads as one run."""

        f = self.out_dir / "log.jsonl"
        if not f.is_file():
            return
        keep = []
        for line in f.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        write_text(f, "".join(x + "\n" for x in keep))

    # --- one step ------------------------------------------------------------------------------------
    def _draw(self, b: int) -> dict:
        """All randomness of one step for the whole global batch (identical on every process)."""
        base = self.s.base
        d, k = self.s.layout.num_units, self.router.num_experts
        c, h, w = base.latent_shape()
        g = self.gen
        out = {"t": base.sample_timesteps(b, g),
               "noise": torch.randn((b, c, h, w), generator=g),
               "gumbel": gumbel_noise((b, d), g),
               "gumbel_codes": gumbel_noise((k, d), g),
               "tie": torch.rand((b, k), generator=g)}
        if base.vae is not None:
            out["vae_eps"] = torch.randn((b, base.latent_channels, h, w), generator=g)
        if self.cfg.data.random_flip:
            out["flip"] = torch.rand((b,), generator=g) < 0.5
        return out

    def train_step(self) -> dict:
        pc, lw, rc = self.cfg.prune, self.cfg.prune.losses, self.cfg.router
        dist, base, dev = self.dist, self.s.base, self.dist.device
        B = pc.batch_size
        idx_all = self.batches.indices(self.step)
        rnd = self._draw(B)
        mine = lambda t: local_slice(t, dist.rank, dist.world_size).to(dev)  # noqa: E731
        idx = mine(idx_all).cpu()
        pixels, captions, sizes = collate(self.s.dataset, idx, sizes=True)
        if "flip" in rnd:
            f = mine(rnd["flip"]).cpu()
            pixels[f] = pixels[f].flip(-1)
            sizes[f] = flip_sizes(sizes[f], pixels.shape[-1])
        x0 = base.encode_images(pixels.to(dev), mine(rnd["vae_eps"]) if "vae_eps" in rnd else None)
        cond = base.conditioning(captions, sizes)
        t, noise = mine(rnd["t"]), mine(rnd["noise"])
        z = self.s.embeddings[idx.to(dev)]

        ns = self.noise_scale(self.step)
        logits = self.router.predict(z)
        pred_gates = self.router.gates(logits, ns * mine(rnd["gumbel"]))
        pred_vec = self.router.arch_vectors(pred_gates)
        warm = self.step < pc.warmup_steps
        if self.step == pc.warmup_steps and rc.codes_init in ("predictor", "ladder"):
            self._init_codes()
        if warm:
            gates = pred_gates
            ratios = self.s.macs_fraction(pred_gates)
            assignment, code_ratio = None, None
        else:
            code_gates = self.router.gates(self.router.codes, ns * rnd["gumbel_codes"].to(dev))
            code_vec = self.router.arch_vectors(code_gates)
            scores = pred_vec.detach() @ code_vec.detach().t()
            assignment = assign(scores, rc.optimal_transport, rc.sinkhorn_epsilon, rc.sinkhorn_iterations,
                                dist.all_reduce_sum if dist.distributed else None, tie_break=mine(rnd["tie"]))
            gates = code_gates[assignment]
            code_ratio = self.s.macs_fraction(code_gates)
            ratios = code_ratio[assignment]

        noisy = base.scheduler.add_noise(x0, noise, t)
        target = diffusion_target(base.scheduler, x0, noise, t, base.prediction_type)
        self.recorder.clear()
        with torch.no_grad():
            teacher_out = cond.predict(self.unet, noisy, t)
        teacher_blocks = self.recorder.take()
        with self.s.space.gated(self.unet, gates):
            out = cond.predict(self.unet, noisy, t)
        student_blocks = self.recorder.take()

        l_ddpm = diffusion_loss(out, target, t, base.scheduler, lw.snr_gamma, base.prediction_type)
        l_out = per_sample_mse(out, teacher_out)
        l_block = block_distill_loss(student_blocks, teacher_blocks)
        l_route = routing_loss(pred_vec, code_vec, assignment, lw.routing_tau) if assignment is not None \
            else torch.zeros_like(l_ddpm)
        # per-sample terms: sum over local rows / global B, so the sum over processes is the global mean
        local = (lw.ddpm * l_ddpm + lw.distill_out * l_out + lw.distill_block * l_block
                 + lw.routing * l_route).sum() / B
        # global-batch terms: gathered tensors carry gradients only through this process's rows
        ratios_all = dist.gather_with_grad(ratios)
        r_mean = ratios_all.mean()
        l_res = resource_loss(r_mean, pc.budget, lw.resource_type)
        l_std, l_max = spread_loss(ratios_all)
        l_con = contrastive_loss(dist.gather_with_grad(pred_vec), dist.gather(z), lw.contrastive_tau)
        loss = local + lw.resource * l_res + lw.spread_std * l_std + lw.spread_max * l_max + lw.contrastive * l_con

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        dist.all_reduce_grads(params)
        f = lr_factor(self.step, pc.lr_warmup_steps)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        self.opt.step()
        self.step += 1

        with torch.no_grad():
            sums = torch.stack([l_ddpm.sum(), l_out.sum(), l_block.sum(), l_route.sum()]).detach()
            sums = dist.all_reduce_sum(sums) / B
            stats = {"step": self.step, "phase": "warmup" if warm else "route",
                     "loss": float(sums @ torch.tensor([lw.ddpm, lw.distill_out, lw.distill_block, lw.routing],
                                                       dtype=sums.dtype))
                     + float(lw.resource * l_res + lw.spread_std * l_std + lw.spread_max * l_max + lw.contrastive * l_con),
                     "ddpm": float(sums[0]), "out": float(sums[1]), "block": float(sums[2]),
                     "res": float(l_res), "con": float(l_con), "route": float(sums[3]), "noise": ns,
                     "std": float(-l_std), "max": float(1 - l_max),
                     "macs": float(r_mean), "lr": self.opt.param_groups[0]["lr"]}
            if assignment is not None:
                a_all = dist.gather(assignment)
                stats["counts"] = torch.bincount(a_all.cpu(), minlength=self.router.num_experts).tolist()
                if B <= 256:  # small batches: the full assignment (tests compare runs on it)
                    stats["assign"] = a_all.tolist()
                stats["code_macs"] = [round(float(x), 5) for x in code_ratio]
        return stats

    def noise_scale(self, step: int) -> float:
        """Gumbel noise scale: 1 in warm-up, then linear to router.noise_final_scale at the last step."""
        pc, final = self.cfg.prune, self.cfg.router.noise_final_scale
        if step < pc.warmup_steps or final == 1.0:
            return 1.0
        span = max(1, pc.steps - 1 - pc.warmup_steps)
        f = min(1.0, (step - pc.warmup_steps) / span)
        return 1.0 + (final - 1.0) * f

    def _init_codes(self) -> None:
        """Codes from the warmed-up predictor (router.codes_init = predictor); same on every process."""
        n = len(self.s.dataset)
        rows = torch.randperm(n, generator=self.gen)[: min(n, 2048)]
        self.router.init_codes_from_predictor_(self.s.embeddings[rows.to(self.dist.device)], self.gen)
        log.info("codes initialised from the predictor over %d training prompts", len(rows))

    # --- loop ----------------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> None:
        pc = self.cfg.prune
        end = pc.steps if stop_after is None else min(pc.steps, stop_after)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._open_tensorboard()
        bar = tqdm(total=pc.steps, initial=self.step, desc="prune", disable=not (self.progress and self.dist.is_main),
                   dynamic_ncols=True)
        logf = open(self.out_dir / "log.jsonl", "a") if self.dist.is_main else None
        k = self.router.num_experts
        window = torch.zeros(k, dtype=torch.long)
        t0 = time.time()
        try:
            while self.step < end:
                st = self.train_step()
                if "counts" in st:
                    window += torch.tensor(st["counts"])
                bar.update(1)
                if self.dist.is_main:
                    post = f"L={st['loss']:.3f} ddpm={st['ddpm']:.3f} out={st['out']:.4f} blk={st['block']:.4f} " \
                           f"res={st['res']:.3f} con={st['con']:.3f} route={st['route']:.3f} macs={st['macs']:.3f}"
                    if "code_macs" in st:
                        share = (window.float() / max(1, int(window.sum()))).tolist()
                        post += " experts(macs/share)=" + " ".join(
                            f"{m:.2f}/{s:.2f}" for m, s in zip(st["code_macs"], share, strict=True))
                    bar.set_postfix_str(post, refresh=False)
                    logf.write(json.dumps(st) + "\n")
                    if self.step % pc.log_every == 0 or self.step == end:
                        logf.flush()
                        self._tensorboard(st, window)
                        window.zero_()
                if self.step % pc.checkpoint_every == 0 or self.step == pc.steps:
                    if logf:
                        logf.flush()
                    self.save_checkpoint()
        finally:
            bar.close()
            if logf:
                logf.close()
            if self.writer is not None:
                self.writer.close()
        log.info("pruning: %d steps in %.1f s", self.step, time.time() - t0)

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: the log.jsonl has everything
            return
        self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    def _tensorboard(self, st: dict, window: torch.Tensor) -> None:
        if self.writer is None:
            return
        for key in ("loss", "ddpm", "out", "block", "res", "con", "std", "max", "macs", "lr"):
            self.writer.add_scalar(f"prune/{key}", st[key], st["step"])
        for i, m in enumerate(st.get("code_macs", [])):
            self.writer.add_scalar(f"experts/macs_{i:02d}", m, st["step"])
        total = int(window.sum())
        if total:
            for i, c in enumerate(window.tolist()):
                self.writer.add_scalar(f"experts/share_{i:02d}", c / total, st["step"])


# ------------------------------------------------------------------------------------------------- summary

@torch.no_grad()
def routing_summary(router: Router, setup: Setup, embeddings: torch.Tensor, groups: list[str] | None = None) -> dict:
    """Inference routing (noise-free cosine argmax) of `embeddings` [N, E]: shares, experts' MACs fractions,
    mean MACs fraction over the prompts, and the same per group label (e.g. toy difficulty) if given."""
    k = router.num_experts
    a = router.route(embeddings.to(next(router.parameters()).device)).cpu()
    macs = setup.macs_fraction(router.expert_gates()).detach().cpu().reshape(-1)
    counts = torch.bincount(a, minlength=k)
    out = {"num_prompts": int(a.numel()), "shares": (counts.float() / a.numel()).tolist(),
           "expert_macs": macs.tolist(), "mean_macs": float(macs[a].mean()), "assignment": a.tolist()}
    if groups is not None:
        per = {}
        for name in sorted(set(groups)):
            m = torch.tensor([g == name for g in groups])
            per[name] = {"count": int(m.sum()), "mean_macs": float(macs[a[m]].mean())}
        out["groups"] = per
    return out


def _prepare_run_dir(cfg: RunConfig, run: RunDir, resume: bool) -> RunConfig:
    """Check the run dir against --resume and return the config to use."""
    run_dir = run.root
    if resume:
        if not run.has_config():
            raise UserError(f"--resume: no run to resume in {run_dir} (no config.yaml)")
        changed = [k for k in diff_configs(run.config(), cfg) if k not in RESUMABLE_KEYS]
        if changed:
            raise UserError(f"--resume: the config differs from {run.config_path} in {', '.join(changed)}")
        return cfg
    if run.latest_checkpoint.is_file() or run.is_pruned():
        raise UserError(f"{run_dir} already holds a pruning run; pass --resume or choose another --run-dir")
    return cfg


def run_prune(cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
              stop_after: int | None = None) -> dict:
    """Run (or resume) the pruning phase; returns the summary written to RUN/prune/summary.json."""

    run = RunDir(run_dir if run_dir is not None else cfg.run_dir())
    run_dir = run.root
    check_data_source(cfg.data)
    detect_layout(resolve_model_path(cfg.model.path))
    dist = Dist.init()
    cfg = _prepare_run_dir(cfg, run, resume)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config_path)
    dist.barrier()
    torch.manual_seed(cfg.seed)
    setup = build_setup(cfg, run_dir, dist, progress=progress)
    ladder = cfg.router.codes_init == "ladder" and cfg.router.num_experts > 1
    # ladder: the loop trains one code on every sample (the static baseline's phase, same seed), the K
    # nested codes are cut from it afterwards
    trainer = PruneTrainer(_single_code(setup) if ladder else setup, run_dir, progress=progress)
    if resume and trainer.load_checkpoint():
        log.info("resumed at step %d", trainer.step)
    trainer.run(stop_after=stop_after)
    if trainer.step < cfg.prune.steps:
        return {"stopped_at": trainer.step}
    router = _ladder_router(setup, trainer.router) if ladder else trainer.router
    need = None
    if cfg.router.refit == "need" and cfg.router.num_experts > 1:
        need = refit_to_need_(setup, router, cfg.router.refit_prompts, cfg.router.refit_steps,
                              seed=cfg.seed, progress=progress and dist.is_main)
    if cfg.router.inference_balance and cfg.router.optimal_transport and cfg.router.num_experts > 1:
        router.calibrate_(setup.embeddings, cfg.router.sinkhorn_epsilon)
    summary = routing_summary(router, setup, setup.embeddings)
    if need is not None:
        summary["need"] = need
    if ladder:
        summary["ladder"] = router.ladder_info
    summary.pop("assignment")
    summary.update({"budget": cfg.prune.budget, "dense_macs": setup.dense_macs, "steps": trainer.step})
    if dist.is_main:
        extra = {"sentence_encoder": cfg.router.sentence_encoder or "packaged:all-MiniLM-L6-v2",
                 "base_model": str(setup.base.path), "budget": cfg.prune.budget, "dense_macs": setup.dense_macs,
                 "macs_convention": "true MACs, batch 1, attention products counted once",
                 "expert_macs_fraction": summary["expert_macs"], "train_shares": summary["shares"]}
        if hasattr(setup.space, "to_dict"):
            extra["arch_space"] = setup.space.to_dict()
        if ladder:
            extra["ladder"] = summary["ladder"]
        router.save(run.prune_dir, extra=extra)
        write_json(run.prune_summary, summary)
    dist.barrier()
    return summary


def _single_code(setup: Setup) -> Setup:
    """The same setup with a one-code router config (codes_init ladder's pruning loop)."""
    cfg = copy.deepcopy(setup.cfg)
    cfg.router.num_experts = 1
    cfg.router.codes_init = "predictor"
    cfg.router.refit = "none"
    return dataclasses.replace(setup, cfg=cfg)


def _ladder_router(setup: Setup, single: Router) -> Router:
    """A K-code router with `single`'s predictor and K nested codes cut from its one code at MACs
    fractions linspace(1 - s, 1 + s, K) x the code's own (capped at 1), s = router.ladder_spread."""
    rc = setup.cfg.router
    router = make_router(setup)
    m0 = float(setup.macs_fraction(single.expert_gates()[0]))
    k = rc.num_experts
    targets = [min(1.0, m0 * (1 - rc.ladder_spread + 2 * rc.ladder_spread * i / max(1, k - 1))) for i in range(k)]
    with torch.no_grad():
        router.predictor.weight.copy_(single.predictor.weight)
        router.predictor.bias.copy_(single.predictor.bias)
        router.codes.copy_(router.ladder_codes(single.codes[0], targets, setup.macs_fraction).to(router.codes))
    got = setup.macs_fraction(router.expert_gates()).reshape(-1).tolist()
    log.info("ladder codes from one code at %.3f MACs: %s", m0, " ".join(f"{x:.3f}" for x in got))
    router.ladder_info = {"single_code_macs": m0, "targets": targets, "macs": got}
    return router


def calibrate_run(run_dir: str | Path) -> list[float]:
    """Re-derive the inference balancing offsets of a finished run (router.inference_balance) from its
    training prompts and rewrite RUN/prune's router files; returns the offsets."""

    run = RunDir(run_dir)
    run_dir = run.root
    cfg = run.config()
    router = Router.load(run.prune_dir)
    meta = json.loads(run.router_meta.read_text())
    size = cfg.model.resolution or 32
    captions = build_dataset(cfg.data, size).captions
    cache = Path(cfg.data.embedding_cache) if cfg.data.embedding_cache else run_dir / "cache"
    emb = prompt_embeddings(captions, cache, cfg.router.sentence_encoder)
    bias = router.calibrate_(emb, cfg.router.sinkhorn_epsilon)
    a = router.route(emb)
    meta["train_shares"] = (torch.bincount(a, minlength=router.num_experts).double() / len(a)).tolist()
    keep = {k: v for k, v in meta.items() if k not in ("format", "num_experts", "num_units", "embedding_dim",
                                                       "gumbel_tau", "gumbel_offset", "min_width_units",
                                                       "width_slices", "scores")}
    router.save(run.prune_dir, extra=keep)
    return bias.tolist()
