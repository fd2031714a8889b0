"""The shape of the code base: no import cycles, `opsd` core never imports `critic`, modules stay small."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("opsd", "critic", "prompts")
# the composition layer: the only opsd modules allowed to import the critic package
COMPOSERS = ("opsd.cli", "opsd.critique", "opsd.pipelines")
MAX_LINES = 420  # "about 400"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str], *, module_level: bool = False) -> set[str]:
    """Project modules `path` imports anywhere in its body (function-level imports included), or only at import
    time (`module_level`: statements at the top of the module, `if`/`try` blocks included)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text("utf-8"))
    nodes = ast.walk(tree) if not module_level else _module_level(tree.body)
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _module_level(body):
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            yield from _module_level(node.body + node.orelse + getattr(node, "finalbody", [])
                                     + [n for h in getattr(node, "handlers", []) for n in h.body])


def graph(module_level: bool = False) -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods), module_level=module_level) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None. Package __init__ -> submodule edges are
    ignored (importing `a.b` runs `a/__init__` first, which is not a cycle by itself)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) is None


def test_no_import_cycles():
    """No cycle at import time. A function-level import (a dispatch such as critic.reference -> critic.multi_turn
    for multi-turn logs) may point back, since it runs after both modules are loaded."""
    assert find_cycle(graph(module_level=True)) is None


def test_opsd_core_never_imports_critic():
    offenders = {name: sorted(m for m in deps if m == "critic" or m.startswith("critic."))
                 for name, deps in graph().items()
                 if name.startswith("opsd") and not name.startswith(COMPOSERS)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_modules_stay_small():
    big = {name: n for name, p in modules().items() if (n := len(p.read_text("utf-8").splitlines())) > MAX_LINES}
    assert big == {}
