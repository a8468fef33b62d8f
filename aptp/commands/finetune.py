"""Fine-tuning phase: route the training set, materialise each expert from the dense weights and
fine-tune it on its prompts (diffusion + distillation against the dense teacher).

Reads RUN/config.yaml and RUN/prune/ (written by `aptp prune`), writes RUN/experts/expert_XX/
(arch.json + model.safetensors, loadable with aptp_export.expert_io.load_expert) and
RUN/experts/experts.json. Under `accelerate launch --num_processes N` experts are split over processes.
"""

from __future__ import annotations

import logging

from engines.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--run", required=True, help="run directory written by `aptp prune` (e.g. runs/toy)")
    parser.add_argument("--resume", action="store_true", help="keep experts that are already finished")
    parser.add_argument("--experts", default=None, help="comma-separated expert ids to fine-tune (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from training.finetune import run_finetune  # heavy (torch): only when the verb runs

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    experts = None
    if args.experts:
        try:
            experts = [int(x) for x in args.experts.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--experts must be comma-separated integers, got {args.experts!r}") from None
    summary = run_finetune(args.run, resume=args.resume, progress=not args.no_progress, experts=experts)
    for e in summary["experts"]:
        last = e.get("loss_last")
        print(f"expert {e['id']:02d}: MACs {e['macs_fraction']:.3f}  share {e['train_share']:.3f}  "
              f"steps {e.get('steps', '-')}  loss {'-' if last is None else f'{last:.4f}'}")
    return 0
