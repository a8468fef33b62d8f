"""Route prompts to experts with an export directory: for each prompt the expert id, that
expert's MACs as a fraction of the dense model's, and the router's score for every expert.
Uses only the torch-free runtime (engines)."""

from __future__ import annotations

import json
import sys

from aptp.args import add_runtime_arguments, read_prompts
from engines import EngineError, Runtime
from engines.errors import UserError


def add_arguments(parser) -> None:
    add_runtime_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def run(args) -> int:
    prompts = read_prompts(args)
    try:
        rt = Runtime.load(args.export, provider=args.provider)
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
