"""Arguments shared by several verbs: the export directory, prompts and provider of the runtime verbs."""

from __future__ import annotations

from engines.errors import UserError
from engines.backends import PROVIDERS


def add_export_argument(parser, help: str = "export directory written by `aptp export` (with manifest.json)"):
    """--export DIR (alias --engines, its name before 0.2): the export directory the runtime loads."""
    parser.add_argument("--export", "--engines", dest="export", required=True, metavar="DIR", help=help)


def add_runtime_arguments(parser) -> None:
    """--export, --prompt, --prompt-file and --provider: what every runtime verb takes."""
    add_export_argument(parser)
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt (repeat for several)")
    parser.add_argument("--prompt-file", metavar="FILE", help="a text file with one prompt per line")
    parser.add_argument("--provider", choices=PROVIDERS, default=None,
                        help="inference backend (default: what the export records: openvino for one written by "
                             "`aptp quantize`, else cpu)")


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
