"""The packaged training configs: list them, or print one with the model-directory and data layouts it
expects (what to put in model.path and data.path). Copy one, edit it, and pass the file to `aptp prune
--config FILE`, or override keys with --set."""

from __future__ import annotations

from training.config_catalog import catalog_text, show


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="config_cmd", metavar="CMD", required=True)
    sub.add_parser("list", help="the packaged configs, one line each")
    s = sub.add_parser("show", help="print a packaged config (or a YAML file) and the layouts it expects")
    s.add_argument("name", help="a packaged config name (see `aptp config list`) or a YAML file")


def run(args) -> int:
    if args.config_cmd == "list":
        print(catalog_text())
    else:
        print(show(args.name), end="")
    return 0
