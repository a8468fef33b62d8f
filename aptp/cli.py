"""The `aptp` command line: one entry point, one module per verb in `aptp.commands`.

Each verb module exposes `add_arguments(parser)` and `run(args) -> int` and imports what it needs
at its top. This file is the one place where `aptp` is lazy: it imports only the module of the verb
being run, so `aptp --help` is instant and the torch-free verbs (route, generate, serve) never pull in
torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from engines.errors import UserError

# verb -> (module, one-line help). Order is the order shown in --help.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("aptp.commands.demo", "end-to-end run on the built-in toy model (CPU, minutes)"),
    "toy": ("aptp.commands.toy", "the built-in toy world: write a dataset or a teacher sample grid"),
    "inspect": ("aptp.commands.inspect", "print the table of prunable units of a UNet"),
    "config": ("aptp.commands.config", "list the packaged training configs, or show one with the layouts it expects"),
    "prune": ("aptp.commands.prune", "pruning phase: train the prompt router and architecture codes"),
    "finetune": ("aptp.commands.finetune", "materialise each expert and fine-tune it on its prompts"),
    "export": ("aptp.commands.export", "export experts, router and shared parts to ONNX / TensorRT"),
    "quantize": ("aptp.commands.quantize", "int8 OpenVINO engines per expert, calibrated on its own prompts, with a quality guard"),
    "route": ("aptp.commands.route", "route prompts to experts with an export directory"),
    "generate": ("aptp.commands.generate", "generate images with an export directory"),
    "serve": ("aptp.commands.serve", "serve an export over HTTP (OpenAI images API, per-expert batching, metrics)"),
    "eval": ("aptp.commands.eval", "quality against MACs: CLIP score, CMMD, FD-CLIP (FID) per model and expert"),
    "bench": ("aptp.commands.bench", "measure latency against MACs per expert and backend"),
    "doctor": ("aptp.commands.doctor", "versions, GPU and working providers here; does an export's plans match"),
}

# What each group of verbs needs beyond the runtime, for the message when it is missing.
_FULL_INSTALL = ('this is a runtime-only install; for training, export and benchmarks install the full toolchain '
                 'from the aptp checkout: pip install -c constraints/cpu.txt -e ".[full]" (GPU: -e ".[full-gpu]" '
                 'with your CUDA torch)')


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no traceback
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _verb_module(verb: str):
    """Import the verb's module; a missing third-party package becomes a one-line install hint."""
    try:
        return importlib.import_module(VERBS[verb][0])
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "aptp":
            raise
        raise UserError(f"`aptp {verb}` needs the package {e.name!r}: {_FULL_INSTALL}") from None


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of `verb` (or of every verb when None) are filled in."""
    parser = _Parser(prog="aptp", description="Adaptive Prompt-Tailored Pruning: train, prune, export, serve.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for name, (_, helptext) in VERBS.items():
        if verb is not None and name != verb:
            sub.add_parser(name, help=helptext, description=helptext)
            continue
        module = _verb_module(name)
        p = sub.add_parser(name, help=helptext, description=(module.__doc__ or helptext).strip())
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    try:
        return version("aptp")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


def _selected_verb(argv: list[str]) -> str | None:
    """The verb named on the command line (the first argument that is one), if any."""
    return next((a for a in argv if a in VERBS), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not sys.stderr.isatty():  # a log file: progress bars every 60 s instead of a carriage return per update
        os.environ.setdefault("TQDM_MININTERVAL", "60")
    verb = _selected_verb(argv)
    prog = f"aptp {verb}" if verb else "aptp"
    try:
        parser = build_parser(verb if verb is not None else "")
        args = parser.parse_args(argv)
        code = args._run(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
