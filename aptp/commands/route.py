"""Route prompts to experts with an exported engines directory: for each prompt the expert id, that
expert's MACs as a fraction of the dense model's, and the router's score for every expert.
Uses only the torch-free runtime (engines)."""

from __future__ import annotations

import json
import sys

from engines import EngineError, Runtime
from engines.errors import UserError
from engines.sessions import PROVIDERS


def add_engine_arguments(parser) -> None:
    """--engines, --prompt, --prompt-file and --provider: what every runtime verb takes."""
    parser.add_argument("--engines", required=True, metavar="DIR", help="export directory (with manifest.json)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt (repeat for several)")
    parser.add_argument("--prompt-file", metavar="FILE", help="a text file with one prompt per line")
    parser.add_argument("--provider", choices=PROVIDERS, default="cpu",
                        help="inference backend (default cpu)")


def add_arguments(parser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def read_prompts(args) -> list[str]:
    """--prompt values then the lines of --prompt-file (blank lines skipped); at least one."""
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{args.prompt_file}: cannot read prompts ({e})") from None
    if not prompts:
        raise UserError("give at least one --prompt or a --prompt-file")
    return prompts


def run(args) -> int:
    prompts = read_prompts(args)
    try:
        rt = Runtime.load(args.engines, provider=args.provider)
        result = rt.route_scores(prompts)
    except EngineError as e:
        raise UserError(str(e)) from None
    for i, (p, e) in enumerate(zip(prompts, result.expert_ids, strict=True)):
        frac = rt.manifest.experts[e].macs_fraction
        scores = [round(float(s), 4) for s in result.scores[i]]
        if args.json:
            print(json.dumps({"prompt": p, "expert": e, "macs_fraction": round(frac, 4), "scores": scores}))
        else:
            print(f"expert {e}  macs {frac:.3f}  scores {scores}  {p}")
    sys.stdout.flush()
    return 0
