"""Generate images with an export directory: routes each prompt to its expert, runs the
denoising loop with classifier-free guidance per expert (prompts batched per expert), and writes
one PNG per prompt plus images.json recording which expert made which image with which seed.
Uses only the torch-free runtime (engines)."""

from __future__ import annotations

from pathlib import Path

from aptp.args import add_runtime_arguments, read_prompts
from engines import EngineError, Runtime
from engines.errors import UserError
from engines.fileio import atomic_path, write_json
from engines.schedulers import SCHEDULERS


def add_arguments(parser) -> None:
    add_runtime_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory for PNGs and images.json")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the export's, e.g. 25)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the export's, e.g. 3.0 for the toy model; "
                             "7.5 for an export that records none)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="most prompts per UNet call (default 8)")
    parser.add_argument("--scheduler", choices=tuple(SCHEDULERS), default=None,
                        help="sampler (default: the one in the manifest)")
    parser.add_argument("--expert", default=None,
                        help="force one expert id (or 'dense') for every prompt instead of routing")


def _progress_bar(total: int):
    """A tqdm bar when tqdm is installed (it is not a runtime dependency), else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(desc="denoise", unit="call", total=total)


def run(args) -> int:
    prompts = read_prompts(args)
    expert = args.expert
    if expert is not None and expert != "dense":
        try:
            expert = int(expert)
        except ValueError:
            raise UserError(f"--expert must be an integer id or 'dense', got {expert!r}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    bars = []  # created at the first model call, so a refused request prints nothing but its error

    def progress(done, total):
        if not bars:
            bars.append(_progress_bar(total))
        if bars[0] is not None:
            bars[0].update(done - bars[0].n)

    try:
        rt = Runtime.load(args.export, provider=args.provider)
        result = rt.generate_with_info(prompts, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                       scheduler=args.scheduler, batch_size=args.batch_size, expert=expert,
                                       progress=progress)
    except EngineError as e:
        raise UserError(str(e)) from None
    finally:
        for bar in bars:
            if bar is not None:
                bar.close()
    out.mkdir(parents=True, exist_ok=True)
    records = result.records()
    for rec, img in zip(records, result.images, strict=True):
        rec["file"] = f"{rec['index']:03d}_expert{rec['expert']}.png"
        with atomic_path(out / rec["file"]) as tmp:
            img.save(tmp, format="PNG")
    write_json(out / "images.json", {"export": str(Path(args.export).resolve()), "images": records,
                                     "seconds": round(result.seconds, 3)})
    for rec in records:
        print(f"{out / rec['file']}  expert {rec['expert']}  seed {rec['seed']}  {rec['prompt']}")
    return 0
