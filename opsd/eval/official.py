"""The official BFCL AST checker (`bfcl-eval` wheel), imported without its model-handler dependencies.

    from opsd.eval.official import official_verdict
    official_verdict(traj)      # {"verdict": "valid" | "invalid" | "n/a", "error": ...}

`bfcl_eval.eval_checker.ast_eval.ast_checker` imports `bfcl_eval.constants.model_config`, which
imports every model handler (anthropic, google, ... SDKs that are not installed). The checker
only reads `MODEL_CONFIG_MAPPING[model].underscore_to_dot` (for names with a dot), so that one
module is stubbed in `sys.modules` with a mapping whose every entry has
`underscore_to_dot=False` (our models emit dotted names verbatim). Nothing else is stubbed.

The checker sees the calls parsed from the reply's raw text exactly as written (a reply whose
`<tool_call>` blocks do not all parse is invalid, as BFCL's decoder would fail on it), and the
task's BFCL function descriptions as shipped. Tasks that are not BFCL tasks get "n/a".
"""
from __future__ import annotations

import json
import sys
import types
from functools import lru_cache

from opsd.io.tasks import bfcl
from opsd.io.trajectories import parse_tool_call_text
from opsd.types import Trajectory

MODEL_NAME = "opsd-student"


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
                      Language.PYTHON, category, MODEL_NAME)
    return bool(out["valid"])


def reply_calls(msg: dict) -> tuple[list[tuple[str, object]], str | None]:
    """[(name, arguments)] of an assistant reply and why it cannot be decoded (None when it can).

    A generated reply (with `token_ids`, or text holding `<tool_call>` blocks) is parsed from its raw
    text; a reply from a server with native `tool_calls` and no blocks in its text uses those.
    """
    text = msg.get("content") or ""
    native = msg.get("tool_calls") or []
    if "<tool_call>" not in text and "token_ids" not in msg and native:
        raw = [(c["function"]["name"], c["function"].get("arguments", "{}")) for c in native]
    else:
        _, parsed, errors = parse_tool_call_text(text)
        if errors:
            return [], "; ".join(errors)
        if text.count("<tool_call>") > len(parsed):
            return [], "a <tool_call> block was never closed"
        raw = [(c["function"]["name"], c["function"]["arguments"]) for c in parsed]
    calls = []
    for name, args in raw:
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return [], f"arguments of {name!r} are not JSON"
        calls.append((name, args))
    return calls, None


def official_verdict(traj: Trajectory) -> dict:
    """{"verdict": "valid" | "invalid" | "n/a", "error": why invalid or not applicable (None when valid)}."""
    category, task_id = traj.meta.get("category"), traj.meta.get("task_id")
    gt = traj.meta.get("ground_truth")
    if traj.meta.get("source") != "bfcl" or category not in bfcl.CATEGORIES or not gt:
        return {"verdict": "n/a", "error": "not a BFCL task with ground truth"}
    if task_id not in raw_functions(category):
        return {"verdict": "n/a", "error": f"{task_id!r} is not in the installed BFCL {category} data"}
    reply = traj.messages[-1] if traj.messages and traj.messages[-1].get("role") == "assistant" else None
    if reply is None:
        return {"verdict": "invalid", "error": "no assistant reply"}
    calls, why = reply_calls(reply)
    if why:
        return {"verdict": "invalid", "error": why}
    if any(not isinstance(a, dict) for _, a in calls):
        return {"verdict": "invalid", "error": "arguments are not a JSON object"}
    ast_checker, Language = official_checker()
    try:
        out = ast_checker(raw_functions(category)[task_id], [{n: a} for n, a in calls], gt, Language.PYTHON,
                          category, MODEL_NAME)
    except Exception as e:  # the checker can trip on shapes it never expected; that reply is not valid
        return {"verdict": "invalid", "error": f"checker raised {type(e).__name__}: {str(e)[:200]}"}
    if out.get("valid"):
        return {"verdict": "valid", "error": None}
    err = out.get("error")
    return {"verdict": "invalid", "error": "; ".join(map(str, err))[:300] if isinstance(err, list) else str(err)[:300]}
