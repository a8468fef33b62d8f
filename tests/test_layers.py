"""The package layering: imports go one way, down `aptp -> benchmarks -> training -> aptp_export -> engines`.

Every import statement of every module is read with `ast` (module level, inside functions, inside
`if TYPE_CHECKING:` alike) and resolved to a file of this repository. The test fails on
- an upward import (a package importing one above it; `engines` importing any package of ours),
- a cycle between files (two or more modules that import each other, directly or around a loop),
- a module touching another module's private names: `from ours import _x`, or `obj._x` where `_x` is not
  defined in the module itself (as a function, class, assignment or `self._x = ...`; an object's own
  `self._x`, inherited ones included, is its business); a few private names of
  other libraries that we use knowingly are listed in THIRD_PARTY_PRIVATE with their reason.
Run as a script to print the report: `python tests/test_layers.py`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first: a package may import those at a lower index only
LAYERS = ("engines", "aptp_export", "training", "benchmarks", "aptp")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the layered packages."""
    mods = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (None: not ours)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in mods:
            return cand
        parts.pop()
    return None


def imports_of(mod: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement in `path`."""
    is_pkg = path.name == "__init__.py"
    package = mod if is_pkg else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, mods)
                if target:
                    out.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the submodule when there is one, else the package
                full = f"{base}.{alias.name}"
                target = full if full in mods else _resolve(base, mods)
                if target:
                    out.append((target, node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "id", None) in ("__import__", "import_module")
                   or getattr(node.func, "attr", None) == "import_module")):
            target = _resolve(node.args[0].value, mods)  # __import__("x") / importlib.import_module("x")
            if target:
                out.append((target, node.lineno))
    return out


def layer(mod: str) -> int:
    return LAYERS.index(mod.split(".")[0])


def analyse() -> tuple[list[str], list[list[str]], int]:
    """(upward imports as 'file:line: a -> b', file cycles as module lists, number of edges)."""
    mods = module_files()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    upward = []
    edges = 0
    for mod, path in mods.items():
        for target, line in imports_of(mod, path, mods):
            if target == mod:
                continue
            edges += 1
            graph[mod].add(target)
            if layer(target) > layer(mod):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {mod} -> {target}")
    return upward, _cycles(graph), edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


THIRD_PARTY_PRIVATE = {
    "_parameters": "torch.nn.Module's parameter dict: materialisation swaps tensors in place",
    "_buffers": "torch.nn.Module's buffer dict: materialisation swaps tensors in place",
    "_get_all_tensors": "onnx.external_data_helper: streaming a > 2 GB graph's external data",
    "_actions": "argparse: `aptp eval` lists its own parser's options",
    "_run": "argparse Namespace attribute set by aptp/cli.py's own set_defaults",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_names(tree: ast.AST) -> set[str]:
    """Names a module defines: functions, classes, assigned names and attributes (self._x = ...), arguments."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def private_access() -> list[str]:
    """'file:line: what' for every touch of another module's private name (see the module doc)."""
    mods = module_files()
    found = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        own = _defined_names(tree)
        where = f"{path.relative_to(ROOT)}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                found += [f"{where}:{node.lineno}: imports {a.name}" for a in node.names if _private(a.name)]
            elif (isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own
                  and node.attr not in THIRD_PARTY_PRIVATE
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


MAX_LINES, MAX_PARAMS = 120, 12
# offenders allowed (name -> (lines, parameters)): none since issue 21; a function may only join this list
# with a reason
KNOWN_LONG: dict[str, tuple[int, int]] = {}


def long_functions() -> dict[str, tuple[int, int]]:
    """'file:Qualified.name' -> (lines, parameters) of every library function over MAX_LINES lines, or public
    with more than MAX_PARAMS parameters (self/cls not counted)."""
    found = {}
    for path in module_files().values():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef):
                    stack.append((child, f"{prefix}{child.name}."))
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = child.args
                    params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                    params -= 1 if a.args and a.args[0].arg in ("self", "cls") else 0
                    lines = child.end_lineno - child.lineno + 1
                    if lines > MAX_LINES or (not child.name.startswith("_") and params > MAX_PARAMS):
                        found[f"{path.relative_to(ROOT)}:{prefix}{child.name}"] = (lines, params)
                    stack.append((child, f"{prefix}{child.name}."))
    return found


def report() -> str:
    upward, cycles, edges = analyse()
    private = private_access()
    long = long_functions()
    lines = [f"{len(module_files())} modules, {edges} imports of our own modules read",
             f"upward imports: {len(upward)}", *[f"  {u}" for u in upward],
             f"file cycles: {len(cycles)}", *[f"  {' <-> '.join(c)}" for c in cycles],
             f"private names of other modules touched: {len(private)}", *[f"  {p}" for p in private],
             f"functions over {MAX_LINES} lines or public with over {MAX_PARAMS} parameters: {len(long)}",
             *[f"  {k}: {v[0]} lines, {v[1]} parameters" for k, v in sorted(long.items())]]
    return "\n".join(lines)


def test_no_upward_imports_and_no_file_cycles():
    upward, cycles, _ = analyse()
    assert not upward and not cycles, "\n" + report()


def test_no_module_touches_another_modules_private_names():
    assert not private_access(), "\n" + report()


def test_no_new_long_functions():
    grown = {k: v for k, v in long_functions().items()
             if k not in KNOWN_LONG or v[0] > KNOWN_LONG[k][0] or v[1] > KNOWN_LONG[k][1]}
    assert not grown, "\n" + report()


def test_private_checker_catches_cross_module_access(tmp_path, monkeypatch):
    for pkg in LAYERS:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "engines" / "a.py").write_text("class A:\n    def _own(self):\n        return self._x\n"
                                               "    def __init__(self):\n        self._x = 1\n")
    (tmp_path / "engines" / "b.py").write_text("from .a import A, _helper\n\ndef f(rt):\n    return rt._own()\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert private_access() == ["engines/b.py:1: imports _helper", "engines/b.py:4: rt._own"]


def test_checker_sees_nested_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an upward import inside a function and a two-file cycle are both found."""
    for pkg in LAYERS:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "engines" / "a.py").write_text("def f():\n    from training import b\n")
    (tmp_path / "training" / "b.py").write_text("from .c import x\n")
    (tmp_path / "training" / "c.py").write_text("import training.b\nx = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    upward, cycles, _ = analyse()
    assert upward == ["engines/a.py:2: engines.a -> training.b"]
    assert cycles == [["training.b", "training.c"]]


if __name__ == "__main__":
    print(report())
