"""The shape of the code base: no import cycles, `opsd` core never imports `opsd_critic`, modules stay small."""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

from tests.conftest import INSTALLED_AS, ROOT

# the composition layer: the only opsd modules allowed to import the critic package
COMPOSERS = ("opsd.cli", "opsd.critique", "opsd.pipelines")
MAX_LINES = 420  # "about 400"
# Imports inside functions, "FILE: MODULE" (fnmatch patterns) -> why they are not at the top. A lazy import is for a
# heavy optional back-end or a measured start-up cost (seconds: `import X` alone, best of 3, on the 2-core dev box);
# anything else goes to the top. Every function-level import must match an entry, and every entry an import.
LAZY_IMPORTS = {
    "opsd/cli.py: opsd.*": "CLI start-up: `opsd --help` imports no stage (0.2 s; every stage imported: several s)",
    "opsd/cli.py: opsd_critic": "CLI start-up: `opsd train` builds a reward critic only with --rl-alpha < 1",
    "opsd/cli.py: opsd_critic.*": "CLI start-up: the critique stack only for `opsd critique`",
    "*: matplotlib*": "optional back-end: plots only when a report is written (matplotlib.pyplot 0.7 s)",
    "*: bfcl_eval.*": "optional back-end: bfcl-eval is installed --no-deps (not a declared dependency), and its "
                      "checker needs the model-config stub first (opsd.eval.official)",
    "opsd/io/models.py: peft": "optional back-end: only LoRA adapter dirs need peft (4.5 s to import)",
    "opsd/train/student.py: peft": "optional back-end: only LoRA training needs peft (4.5 s to import)",
    "opsd/io/tables.py: datasets": "optional back-end: only Parquet/Arrow/datasets inputs and outputs (0.9 s); "
                                   "opsd.io.records is imported by validate and critique",
    "opsd/io/tables.py: huggingface_hub": "optional back-end: only hub-cache dataset inputs",
    "opsd/rollout/client.py: openai": "openai (0.6 s): only the openai rollout backend; hf rollouts never need it",
    "opsd/rollout/multi_turn.py: openai": "openai (0.6 s): only the openai rollout backend",
    "critic/__init__.py: opsd_critic.llm": "openai (0.6 s): only LLM critics; hint and train nest CriticConfig only",
    "opsd/logs.py: opsd.io.models": "start-up: `opsd validate`/`split` import opsd.logs; torch 1.5 s",
    "opsd/logs.py: opsd.render": "start-up: `opsd validate`/`split` import opsd.logs; the tokenizer path loads "
                                 "transformers",
    "opsd/render.py: transformers": "start-up: the critic package imports opsd.render; `opsd critique` and "
                                    "`validate` never load transformers (0.8 s) or torch",
    "opsd/render.py: opsd.io.models": "start-up: as above (opsd.io.models imports torch, 1.5 s)",
    "opsd/serve/server.py: opsd.io.models": "start-up: `opsd serve` runs vLLM in its own venv; torch (1.5 s) only "
                                            "to resolve the embedded model's path",
    "opsd/serve/adapters.py: opsd.io.models": "start-up: as above (opsd serve imports adapters via server)",
    "opsd/serve/adapters.py: torch": "start-up: only flattening stacked LoRA adapters needs torch (1.5 s)",
    "opsd/serve/adapters.py: safetensors.torch": "start-up: as above (imports torch)",
}


def module_name(path: Path) -> str:
    """The import name of a file: critic/llm.py -> opsd_critic.llm (the folders install under INSTALLED_AS' names)."""
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    parts = [INSTALLED_AS[folder], *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for folder in INSTALLED_AS for p in (ROOT / folder).rglob("*.py")}


def _statements(tree: ast.Module, *, module_level: bool):
    """Import statements at import time (the module body, `if`/`try` blocks included), or every other one."""
    top = set(map(id, _module_level(tree.body)))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and (id(n) in top) == module_level]


def _targets(node, package: str, known: set[str]) -> list[str]:
    """What an import statement names: `import a.b` -> a.b; `from a import b` -> a.b when that is a known module
    (a submodule), else a (a name defined in a); relative imports resolved against `package`."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return subs + ([base] if len(subs) < len(node.names) else [])


def imports_of(path: Path, name: str, known: set[str], *, module_level: bool | None = None) -> set[str]:
    """Project modules `path` imports: at every level (default), only at import time (`module_level=True`) or only
    inside functions (`module_level=False`)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text("utf-8"))
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))] if module_level is None \
        else _statements(tree, module_level=module_level)
    for node in nodes:
        for t in _targets(node, package, known):
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def function_level_imports() -> list[str]:
    """Every import inside a function of the packages, as "FILE: MODULE" (relative imports resolved)."""
    mods = modules()
    out = []
    for name, path in sorted(mods.items()):
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _statements(ast.parse(path.read_text("utf-8")), module_level=False):
            out += [f"{path.relative_to(ROOT).as_posix()}: {t}" for t in _targets(node, package, set(mods))]
    return out


def _module_level(body):
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            yield from _module_level(node.body + node.orelse + getattr(node, "finalbody", [])
                                     + [n for h in getattr(node, "handlers", []) for n in h.body])


def graph(module_level: bool | None = None) -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods), module_level=module_level) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None. A package and its submodule count like any
    two modules: `pkg/__init__` importing `pkg.sub` while `pkg.sub` imports a name from `pkg` is a cycle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
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
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) == ["p", "p.x", "p"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p.y"}, "p.y": set()}) is None


def test_imports_inside_functions_count(tmp_path):
    """The graph sees an import inside a function (two levels deep) as an edge; module_level=True does not."""
    (tmp_path / "a.py").write_text("import os\n\ndef f():\n    def g():\n        from b import x\n    return g\n")
    assert imports_of(tmp_path / "a.py", "a", {"a", "b"}) == {"b"}
    assert imports_of(tmp_path / "a.py", "a", {"a", "b"}, module_level=True) == set()
    assert imports_of(tmp_path / "a.py", "a", {"a", "b"}, module_level=False) == {"b"}


def test_no_import_cycles():
    """No cycle at any level: an import inside a function counts like one at the top."""
    assert find_cycle(graph()) is None


def test_imports_inside_functions_are_the_listed_ones():
    """Every function-level import has a reason in LAZY_IMPORTS (a heavy optional back-end or a measured start-up
    cost), and every entry still matches one (no stale reasons)."""
    found = function_level_imports()
    unlisted = [f for f in found if not any(fnmatch.fnmatchcase(f, pat) for pat in LAZY_IMPORTS)]
    assert unlisted == []
    stale = [pat for pat in LAZY_IMPORTS if not any(fnmatch.fnmatchcase(f, pat) for f in found)]
    assert stale == []
    assert all(reason.strip() for reason in LAZY_IMPORTS.values())


def test_opsd_core_never_imports_critic():
    offenders = {name: sorted(m for m in deps if m.split(".")[0] == "opsd_critic")
                 for name, deps in graph().items()
                 if name.split(".")[0] == "opsd" and not name.startswith(COMPOSERS)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_modules_stay_small():
    big = {name: n for name, p in modules().items() if (n := len(p.read_text("utf-8").splitlines())) > MAX_LINES}
    assert big == {}
