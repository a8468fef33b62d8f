"""Quantize an export to int8 for CPUs: per expert, NNCF post-training quantization of its graph to an OpenVINO
IR, calibrated on the prompts the router sends to that expert (their whole denoising trajectory, with
classifier-free-guidance pairs), kept only if its images stay close to the fp32 expert's (quality guard);
the layers whose int8 costs the most fidelity are found by measurement and kept in fp32. Writes a complete
export directory (--out) that `aptp generate/serve/bench/eval` run on OpenVINO by default, with
quantize_report.md. Needs `pip install -e ".[quantize]"` (openvino, nncf)."""

from __future__ import annotations

import json
from pathlib import Path

from aptp.args import add_export_argument
from engines.errors import UserError


def add_arguments(parser) -> None:
    add_export_argument(parser, help="the fp32 export directory to quantize (written by `aptp export`)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new export directory (must not exist or be empty)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="calibration prompts, one per line (your training captions; default for the toy "
                             "model: the toy world's training captions)")
    parser.add_argument("--guard-prompts", metavar="FILE",
                        help="held-out prompts for the quality guard, one per line (default for the toy model: "
                             "held-out toy captions)")
    parser.add_argument("--per-expert", type=int, default=16, help="calibration prompts per expert (default 16)")
    parser.add_argument("--guard-per-expert", type=int, default=8, help="guard images per expert (default 8)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps of calibration and guard (default: the export's, as the runtime uses)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale of calibration and guard (default: the export's, as the runtime uses)")
    parser.add_argument("--min-psnr", type=float, default=30.0, help="guard: every image >= this many dB (default 30)")
    parser.add_argument("--mean-psnr", type=float, default=35.0, help="guard: mean >= this many dB (default 35)")
    parser.add_argument("--experts", default=None, help="comma-separated expert ids (default: all)")
    parser.add_argument("--random-calibration", action="store_true",
                        help="calibrate on random prompts of the pool instead of each expert's own (an ablation)")
    parser.add_argument("--rescan", action="store_true",
                        help="run the sensitivity scan for every expert that needs it (default: the first one; "
                             "the others try its order)")
    parser.add_argument("--fp32-groups", default=None, metavar="G1,G2",
                        help="keep these layer groups in fp32 from the start instead of scanning (groups: "
                             "time_embedding, conv_in, conv_out, attention_scores, cross_attention_kv, resamplers, "
                             "feed_forward, outer_blocks)")
    parser.add_argument("--threads", type=int, default=0, help="inference threads (0 = one per core)")


def _lines(path: str | None) -> list[str] | None:
    if path is None:
        return None
    try:
        lines = [x.strip() for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read prompts ({e})") from None
    if not lines:
        raise UserError(f"{path}: no prompts in it")
    return lines


def _manifest(export: str) -> dict:
    try:
        return json.loads((Path(export) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def toy_world(export: str) -> str | None:
    """The toy world of an export of a built-in toy teacher ("v1" / "v2"), None for another model."""
    base = str(_manifest(export).get("base_model", ""))
    if "toy-teacher-v2" in base:
        return "v2"
    return "v1" if "toy-teacher" in base else None


def default_pools(export: str, prompts: list[str] | None, guard: list[str] | None, n: int = 1024):
    """(calibration pool, guard pool): the given ones, or for the toy model the toy world's training captions
    and held-out captions (a seed no other evaluation uses); an error for another model without them."""
    world = toy_world(export)
    if (prompts is None or guard is None) and world is None:
        raise UserError(f"{export}: not the toy model: give --prompts FILE (training captions) and --guard-prompts "
                        "FILE (held-out captions)")
    if prompts is None or guard is None:
        from training.toy import EVAL_SEED, captions

        prompts = prompts if prompts is not None else [c for c, _ in captions(n, seed=0, world=world)]
        guard = guard if guard is not None else [c for c, _ in captions(n, seed=EVAL_SEED + 13, world=world)]
    return prompts, guard


def default_sampling(export: str) -> tuple[int, float]:
    """(steps, guidance) that the runtime uses for this export when a caller names none: the manifest's
    `sampling`; for a toy export written before format 4, its teacher's sampling.json; else 25 / 7.5."""
    rec = _manifest(export).get("sampling")
    if isinstance(rec, dict):
        return int(rec["steps"]), float(rec["guidance_scale"])
    world = toy_world(export)
    if world is not None:
        from training.toy import teacher_dir

        f = teacher_dir(world) / "sampling.json"
        if f.is_file():
            s = json.loads(f.read_text())
            return int(s.get("num_inference_steps", 25)), float(s.get("guidance_scale", 7.5))
    return 25, 7.5


def run(args) -> int:
    from aptp_export.quantize import QuantizeOptions, quantize_export

    steps, guidance = default_sampling(args.export)
    args.steps = steps if args.steps is None else args.steps
    args.guidance = guidance if args.guidance is None else args.guidance
    for name in ("per_expert", "guard_per_expert", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    experts = None
    if args.experts:
        try:
            experts = [int(x) for x in args.experts.split(",")]
        except ValueError:
            raise UserError(f"--experts must be comma-separated integers, got {args.experts!r}") from None
    pool, guard = default_pools(args.export, _lines(args.prompts), _lines(args.guard_prompts))
    opts = QuantizeOptions(prompts=pool, guard_prompts=guard,
                           per_expert=args.per_expert, guard_per_expert=args.guard_per_expert, steps=args.steps,
                           guidance=args.guidance,
                           min_psnr=args.min_psnr, mean_psnr=args.mean_psnr, experts=experts,
                           random_calibration=args.random_calibration, rescan=args.rescan, threads=args.threads,
                           fp32_groups=args.fp32_groups.split(",") if args.fp32_groups else None)
    report = quantize_export(args.export, args.out, opts)
    kinds = [e["precision"] for e in report["experts"]]
    print(f"wrote {args.out}: {kinds.count('int8')} int8, {kinds.count('int8_weights')} int8 weights-only, "
          f"{kinds.count('fp32')} fp32 experts ({report['seconds']:.0f} s); see {Path(args.out) / 'quantize_report.md'}")
    return 0
