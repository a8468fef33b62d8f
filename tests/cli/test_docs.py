"""Docs that cannot drift: every `aptp …` command and every `pip install …` line in README.md and docs/*.md is
checked against the real parser (the verb exists, every flag exists for that verb or its sub-command) and the
real extras of pyproject.toml, written in the checkout form (`pip install -e ".[extra]"`: the project is on no
package index). The checker is tested on deliberate breakage too, so it cannot pass vacuously."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from aptp.cli import VERBS, build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])

_CMD = re.compile(r"(?:^|[`\s(])(aptp (?:[a-z][a-z-]*)(?:[^`\n|]|\\\|)*)")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?=[\s=\]\)`,.;:]|$)")
_PIP = re.compile(r"pip install[^\n`]*")


def _joined_lines(text: str) -> list[tuple[int, str]]:
    """Lines with shell continuations (trailing backslash) joined, numbered by their first line."""
    out, buf, start = [], "", 0
    for i, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = i
        if line.rstrip().endswith("\\") and not line.rstrip().endswith("\\|"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    return out


def commands(text: str) -> list[tuple[int, str]]:
    """(line, command) of every `aptp VERB …` mention; a trailing `# comment` is dropped."""
    found = []
    for n, line in _joined_lines(text):
        for m in _CMD.finditer(line):
            cmd = m.group(1).split(" #")[0].strip()
            if cmd.split()[1] in ("is", "on", "and", "or", "for", "to", "as", "was", "in"):
                continue  # prose ("aptp is ..."), not a command
            found.append((n, cmd))
    return found


def _options(parser) -> dict[str, set[str]]:
    """Option strings of a parser and of each of its sub-commands (key "" = the parser itself)."""
    import argparse

    out = {"": set()}
    for a in parser._actions:
        out[""].update(a.option_strings)
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out[name] = {o for x in sub._actions for o in x.option_strings}
    return out


_PARSERS: dict[str, dict[str, set[str]]] = {}


def check_command(cmd: str) -> list[str]:
    """Problems of one documented command (empty = fine)."""
    words = cmd.split()
    verb = words[1]
    if verb not in VERBS:
        return [f"no verb {verb!r}"]
    if verb not in _PARSERS:
        sub = build_parser(verb)._subparsers._group_actions[0].choices[verb]
        _PARSERS[verb] = _options(sub)
    opts = _PARSERS[verb]
    allowed = set(opts[""])
    sub = words[2] if len(words) > 2 else ""
    if sub in opts:  # aptp toy grid --out ...
        allowed |= opts[sub]
    elif len(opts) > 1 and "/" in sub:  # "aptp toy data/grid/eval"
        bad = [s for s in sub.split("/") if s not in opts]
        if bad:
            return [f"no sub-command {', '.join(bad)}"]
    rest = " ".join(words[2:])
    rest = re.sub(r"--set [^\s]+", "--set X", rest)  # values of --set name config keys, not flags
    rest = re.sub(r'"[^"]*"', '""', rest)  # quoted prompts may contain dashes
    return [f"no flag {f}" for f in _FLAG.findall(rest) if f not in allowed]


def check_pip(line: str) -> list[str]:
    """Problems of one `pip install …` line: extras must exist; aptp itself only from the checkout."""
    problems = []
    if re.search(r"(?<![-\w])[\"']?aptp\[", line):
        problems.append('installs "aptp[...]" from an index; the checkout form is -e ".[...]"')
    for group in re.findall(r'(?:-e\s+)?["\']?\.\[([a-z0-9,\-_ ]+)\]', line):
        for extra in (e.strip() for e in group.split(",")):
            if extra and extra not in EXTRAS:
                problems.append(f"no extra {extra!r}")
    return problems


def _all(kind):
    rows = []
    for path in DOCS:
        text = path.read_text()
        if kind == "cmd":
            rows += [(path, n, c) for n, c in commands(text)]
        else:
            rows += [(path, n, m.group(0)) for n, line in _joined_lines(text) for m in _PIP.finditer(line)]
    return rows


def test_every_documented_command_matches_the_parser():
    rows = _all("cmd")
    assert len(rows) > 60  # the extraction finds the docs' commands
    bad = [f"{p.relative_to(ROOT)}:{n}: {c}: {'; '.join(pr)}" for p, n, c in rows if (pr := check_command(c))]
    assert not bad, "\n".join(bad)


def test_every_documented_pip_line_names_real_extras_in_the_checkout_form():
    rows = _all("pip")
    assert len(rows) > 5
    bad = [f"{p.relative_to(ROOT)}:{n}: {c}: {'; '.join(pr)}" for p, n, c in rows if (pr := check_pip(c))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("cmd, problem", [
    ("aptp generate --export DIR --promt x --out O", "no flag --promt"),      # a renamed / misspelt flag
    ("aptp serve --engine aptp-demo/export", "no flag --engine"),
    ("aptp quantise --export DIR", "no verb 'quantise'"),
    ("aptp toy grid --out g.png --scale 4 --teacher T --bogus", "no flag --bogus"),
    ("aptp toy data/grid/evaluate", "no sub-command evaluate"),
])
def test_the_checker_fails_on_drift(cmd, problem):
    assert problem in check_command(cmd)


def test_the_checker_accepts_real_commands():
    for cmd in ("aptp generate --export DIR --prompt \"a red - circle\" --out O --steps 25",
                "aptp toy grid --out grid.png -n 16", "aptp prune --config demo --set prune.steps=10",
                "aptp eval --diagnose probe,oracle,health [--run DIR] [--static-run DIR]"):
        assert check_command(cmd) == [], cmd


def test_the_pip_checker_fails_on_drift():
    assert check_pip('pip install "aptp[gpu]"')
    assert check_pip('pip install -e ".[runtim,serve]"') == ["no extra 'runtim'"]
    assert check_pip('pip install -c constraints/cpu.txt -e ".[full,quantize]"') == []
