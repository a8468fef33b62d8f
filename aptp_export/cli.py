"""The `aptp` command line: one entry point, one module per verb.

Each verb lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`. Verb modules import only the standard library at top
level so that `aptp --help` is instant; heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from .errors import UserError

# verb -> (module, one-line help). Order is the order shown in --help.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("aptp_export.commands.demo", "end-to-end run on the built-in toy model (CPU, minutes)"),
    "toy": ("aptp_export.commands.toy", "the built-in toy world: write a dataset or a teacher sample grid"),
    "inspect": ("aptp_export.commands.inspect", "print the table of prunable units of a UNet"),
    "prune": ("aptp_export.commands.prune", "pruning phase: train the prompt router and architecture codes"),
    "finetune": ("aptp_export.commands.finetune", "materialise each expert and fine-tune it on its prompts"),
    "export": ("aptp_export.commands.export", "export experts, router and shared parts to ONNX / TensorRT"),
    "route": ("aptp_export.commands.route", "route prompts to experts with an exported engines directory"),
    "generate": ("aptp_export.commands.generate", "generate images with an exported engines directory"),
    "bench": ("aptp_export.commands.bench", "measure latency against MACs per expert and backend"),
}


def _available_verbs() -> dict[str, tuple[str, str]]:
    """Verbs whose module exists in this installation (later issues add more)."""
    found = {}
    for verb, (mod, helptext) in VERBS.items():
        if importlib.util.find_spec(mod) is not None:
            found[verb] = (mod, helptext)
    return found


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no traceback
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aptp", description="Adaptive Prompt-Tailored Pruning: train, prune, export, serve.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb, (mod, helptext) in _available_verbs().items():
        module = importlib.import_module(mod)
        p = sub.add_parser(verb, help=helptext, description=(module.__doc__ or helptext).strip())
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("aptp")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args._run(args)
    except UserError as e:
        print(f"aptp {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aptp {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
