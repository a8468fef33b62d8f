"""The built-in toy world and its teacher.

  aptp toy data --out DIR -n N --seed S      write N samples in the Hugging Face imagefolder layout
  aptp toy grid --out grid.png -n 16         captioned sample grid of the teacher (held-out captions,
                                             25 DDIM steps, guidance 3.0 by default)
  aptp toy eval -n 64                        colour / position match of the teacher on held-out captions

Seeds >= 1000000 draw held-out (evaluation) captions, seeds below draw training captions.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from engines.errors import UserError
from engines.fileio import atomic_path, write_json
from training import toy
from training.toy.model import SAMPLING_DEFAULTS
from training.toy.world import EVAL_SEED

GUIDANCE = SAMPLING_DEFAULTS["guidance_scale"]  # the toy teacher's recommended CFG scale


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the usage lines of the docstring
    sub = parser.add_subparsers(dest="toy_cmd", metavar="CMD", parser_class=type(parser))
    sub.required = True

    d = sub.add_parser("data", help="write a toy dataset in the imagefolder layout")
    d.add_argument("--out", required=True, help="output directory (PNG files + metadata.jsonl)")
    d.add_argument("-n", type=int, default=1000, help="number of samples (default 1000)")
    d.add_argument("--seed", type=int, default=0, help=f"stream seed; >= {EVAL_SEED} gives held-out captions")

    def sampling_args(p, n_default):
        p.add_argument("-n", type=int, default=n_default, help=f"number of captions (default {n_default})")
        p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
        p.add_argument("--guidance", type=float, default=GUIDANCE,
                       help=f"classifier-free guidance scale (default {GUIDANCE}, the toy teacher's recommended scale)")
        p.add_argument("--seed", type=int, default=0, help="noise seed; prompt i uses seed + i")
        p.add_argument("--caption-seed", type=int, default=EVAL_SEED,
                       help=f"toy stream seed the captions come from (default {EVAL_SEED}: held out)")
        p.add_argument("--teacher", default=None, help="teacher directory (default: the shipped toy teacher)")
        p.add_argument("--world", choices=("v1", "v2"), default=None,
                       help="toy world the captions come from (default: the teacher's, from its sampling.json)")

    g = sub.add_parser("grid", help="write a captioned sample grid PNG of the teacher")
    g.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    sampling_args(g, 16)
    g.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscale of each image (default 4)")

    e = sub.add_parser("eval", help="score the teacher on held-out captions (colour and position match)")
    sampling_args(e, 64)
    e.add_argument("--json", default=None, help="also write the figures to this JSON file")


def _check(args) -> None:
    if args.n <= 0:
        raise UserError(f"-n must be > 0, got {args.n}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.toy_cmd == "data":
        return
    if args.steps < 1 or args.steps > 1000:
        raise UserError(f"--steps must be in 1..1000, got {args.steps}")
    if not args.guidance >= 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")
    if args.caption_seed < 0:
        raise UserError(f"--caption-seed must be >= 0, got {args.caption_seed}")
    if args.toy_cmd == "grid":
        if not str(args.out).lower().endswith(".png"):
            raise UserError(f"--out must be a .png file, got {args.out}")
        if not 1 <= args.scale <= 32:
            raise UserError(f"--scale must be in 1..32, got {args.scale}")


def run(args) -> int:
    _check(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.toy_cmd == "data":
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        toy.write_imagefolder(out, args.n, args.seed)
        print(f"wrote {args.n} samples to {out} (metadata.jsonl + PNG)")
        return 0

    from training.toy.report import evaluate, make_grid

    unet, scheduler, text = toy.load_teacher(path=args.teacher)
    world = args.world
    if world is None:
        rec = (toy.teacher_dir() if args.teacher is None else Path(args.teacher)) / "sampling.json"
        world = json.loads(rec.read_text()).get("toy_world", "v1") if rec.is_file() else "v1"

    res = evaluate(unet, text, scheduler, n=args.n, steps=args.steps, guidance_scale=args.guidance,
                   seed=args.seed, caption_seed=args.caption_seed, world=world)
    if args.toy_cmd == "grid":
        grid = make_grid(res["images"], res["captions"], scale=args.scale)
        with atomic_path(args.out) as tmp:
            grid.save(tmp, format="PNG")
        print(f"wrote {args.out} ({args.n} images)")
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"{args.n} captions, {args.steps} DDIM steps, guidance {args.guidance}: "
          f"colour match {fmt(res['colour'])}, position match {fmt(res['position'])} "
          f"(over {res['n_position']} captions with a position)")
    for d, r in [*res["by_difficulty"].items(), *res["by_template"].items()]:
        print(f"  {d:14s} n={r['n']:3d}  colour {fmt(r['colour'])}  position {fmt(r['position'])}")
    if getattr(args, "json", None):
        write_json(args.json, {k: v for k, v in res.items() if k not in ("images", "scores")}
                   | {"steps": args.steps, "guidance": args.guidance, "seed": args.seed,
                      "caption_seed": args.caption_seed})
    return 0
