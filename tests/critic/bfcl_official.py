"""The official BFCL AST checker, imported without its model-handler dependencies.

`bfcl_eval.eval_checker.ast_eval.ast_checker` imports `bfcl_eval.constants.model_config`, which
imports every model handler (anthropic, google, ... SDKs that are not installed). The checker
only reads `MODEL_CONFIG_MAPPING[model].underscore_to_dot` (for names with a dot), so that one
module is stubbed in `sys.modules` with a mapping whose every entry has
`underscore_to_dot=False` (our model emits dotted names verbatim). Nothing else is stubbed.
"""
from __future__ import annotations

import json
import sys
import types
from functools import lru_cache

from opsd.io.tasks import bfcl


def _stub_model_config() -> None:
    name = "bfcl_eval.constants.model_config"
    if name in sys.modules:
        return

    class _Cfg:
        underscore_to_dot = False

    class _Mapping(dict):
        def __missing__(self, key):
            return _Cfg()

    mod = types.ModuleType(name)
    mod.MODEL_CONFIG_MAPPING = _Mapping()
    sys.modules[name] = mod


def official_checker():
    """(ast_checker, Language) from the installed bfcl-eval package."""
    _stub_model_config()
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    return ast_checker, Language


@lru_cache(maxsize=None)
def raw_functions(category: str) -> dict[str, list[dict]]:
    """{task id: BFCL function descriptions as shipped (BFCL types, not JSON Schema)}."""
    path = bfcl.data_dir() / f"BFCL_v4_{category}.json"
    with path.open(encoding="utf-8") as f:
        return {d["id"]: d["function"] for d in map(json.loads, f) if d}


def official_valid(category: str, task_id: str, calls: list[tuple[str, dict]], ground_truth: list[dict]) -> bool:
    """BFCL's verdict for `calls` = [(name, arguments)] on one task."""
    ast_checker, Language = official_checker()
    out = ast_checker(raw_functions(category)[task_id], [{n: a} for n, a in calls], ground_truth,
                      Language.PYTHON, category, "opsd-student")
    return bool(out["valid"])
