"""BFCL possible-answer matching: ground truth parsed, one reply's parsed calls matched against it, and where each
mismatch sits in the reply text (a `Problem`). The semantics are those of BFCL's AST checker, as described in
`opsd_critic.reference`, whose critic reports the earliest problem; `opsd_critic.multi_turn` uses the same matching
reply by reply, and `opsd.critique.outcomes` to classify held-out replies.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from opsd_critic.calls import (
    CLOSE,
    CallBlock,
    Node,
    OPEN,
    name_span,
    render_value,
    string_content_span,
)
from opsd_critic.schema import closing_span, key_name_span

_STD_RE = re.compile(r"[ ,./\-_*^]")
_PY_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "array": list, "object": dict}


def standardize(s: str) -> str:
    """BFCL string normalisation: drop ` ,./-_*^`, lowercase, `'` -> `"`."""
    return _STD_RE.sub("", s).lower().replace("'", '"')


def _std(x):
    return standardize(x) if isinstance(x, str) else x


def _py_type(schema: dict) -> type:
    t = schema.get("type") if isinstance(schema, dict) else None
    return _PY_TYPES.get(t, str) if isinstance(t, str) else str  # untyped ("any") is a string, as in BFCL


def _answer_type(acceptable: list):
    for a in acceptable:
        if a != "":
            return type(a)
    return None


def _type_ok(value, acceptable: list, expected: type, nested: type | None) -> tuple[bool, bool]:
    """(valid, is_variable), like BFCL's `type_checker` (nested check one level deep)."""
    ans_type = _answer_type(acceptable)
    is_variable = ans_type is not None and ans_type != expected
    if type(value) == expected:
        if nested is None:
            return True, is_variable
        for item in acceptable:
            if type(item) == list and not all(_type_ok(v, item, nested, None)[0] for v in value):
                continue
            return True, is_variable
    if ans_type is not None and type(value) == ans_type:
        return True, True
    return False, is_variable


def _dict_ok(value: dict, acceptable: list) -> bool:
    for ans in acceptable:
        if ans == "" or not isinstance(ans, dict):
            continue
        good = all(k in ans and _std(v) in [_std(a) for a in ans[k]] for k, v in value.items())
        good = good and all(k in value or "" in vals for k, vals in ans.items())
        if good:
            return True
    return False


def _list_dict_ok(value: list, acceptable: list) -> bool:
    for ans in acceptable:
        if not isinstance(ans, (list, str)) or len(value) != len(ans):
            continue
        if all(isinstance(v, dict) and _dict_ok(v, [a]) for v, a in zip(value, ans)):
            return True
    return False


def _list_ok(value: list, acceptable: list) -> bool:
    std = [_std(v) for v in value]
    return any(isinstance(ans, (list, str)) and std == [_std(a) for a in ans] for ans in acceptable)


def value_ok(value, acceptable: list, schema: dict) -> bool:
    """Is `value` acceptable for a parameter with `schema`, under BFCL possible-answer semantics?"""
    expected = _py_type(schema)
    nested = None
    if expected is list and isinstance(schema.get("items"), dict):
        nested = _py_type(schema["items"])
    if schema.get("type") == "number" and type(value) is int:
        value = float(value)  # an int is accepted where a float is expected
    ok, is_variable = _type_ok(value, acceptable, expected, nested)
    if not ok:
        return False
    if not is_variable:
        if expected is dict:
            return _dict_ok(value, acceptable)
        if expected is list and nested is dict:
            return _list_dict_ok(value, acceptable)
        if expected is str:
            return standardize(value) in [standardize(a) for a in acceptable if isinstance(a, str)]
        if expected is list:
            return _list_ok(value, acceptable)
    return value in acceptable


@dataclass
class Problem:
    """Why a call does not match a ground-truth entry, located in the step text."""

    category: str
    span: tuple[int, int] | None
    hint_vars: list[dict]


def call_problems(blk: CallBlock, gt_name: str, gt_params: dict, tools: dict[str, dict]) -> list[Problem]:
    """Problems of one parsed call against one ground-truth entry (empty list = it matches)."""
    if blk.name != gt_name:
        return [Problem("wrong_function", name_span(blk), [{"expected": gt_name}])]
    fn = tools.get(gt_name) or {}
    params = fn.get("parameters") or {}
    props = params.get("properties") or {}
    args: Node = blk.args
    if not args.is_object:
        return [Problem("wrong_value", (args.start, args.end), [{"function": gt_name, "parameter": "arguments",
                                                                  "expected": ""}])]
    out: list[Problem] = []
    allowed = [p for p in gt_params if p in props]
    for key, f in args.fields.items():
        if key not in props or key not in gt_params:
            out.append(Problem("unknown_parameter", key_name_span(f),
                               [{"function": gt_name, "valid_parameters": allowed},
                                {"function": gt_name, "valid_parameters": []}]))
        elif not value_ok(f.value.value, gt_params[key], props[key]):
            good = [a for a in gt_params[key] if a != ""]
            variants = [{"function": gt_name, "parameter": key, "expected": render_value(a)} for a in good]
            # a string where a string is expected: its quotes are right; any other value is wrong whole
            span = string_content_span(f.value) if _py_type(props[key]) is str else (f.value.start, f.value.end)
            out.append(Problem("wrong_value", span, variants + [{"function": gt_name, "parameter": key, "expected": ""}]))
    required = [p for p in params.get("required") or [] if p not in args.fields]
    required += [p for p, vals in gt_params.items() if p not in args.fields and "" not in vals and p not in required]
    for p in required:
        sub = props.get(p) or {}
        desc = str(sub.get("description") or "")[:120]
        vals = [render_value(a) for a in gt_params.get(p, []) if a != ""]
        base = {"function": gt_name, "parameter": p, "type": "", "description": ""}
        variants = [{**base, "value": v} for v in vals[:3]] + [{**base, "description": desc, "value": ""},
                                                              {**base, "value": ""}]
        out.append(Problem("missing_required", closing_span(args), variants))
    return out


def parse_ground_truth(gt) -> list[tuple[str, dict]]:
    """[(fn_name, {param: [acceptable...]})] from BFCL possible-answer format; raises ValueError."""
    if not isinstance(gt, list) or not gt:
        raise ValueError("meta.ground_truth must be a non-empty list of {fn_name: {param: [values]}}")
    out = []
    for k, entry in enumerate(gt):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"meta.ground_truth[{k}] must be a single-key object {{fn_name: {{param: [values]}}}}")
        (name, params), = entry.items()
        if not isinstance(params, dict) or not all(isinstance(v, list) for v in params.values()):
            raise ValueError(f"meta.ground_truth[{k}].{name} must map each parameter to a list of acceptable values")
        out.append((name, params))
    return out


def match_calls(calls: list[CallBlock], gt: list[tuple[str, dict]], tools: dict[str, dict]) -> dict[int, int]:
    """{gt index: call index}, greedily in ground-truth order (BFCL's no-order matching)."""
    matched: dict[int, int] = {}
    for i, (name, params) in enumerate(gt):
        for j, blk in enumerate(calls):
            if j not in matched.values() and not call_problems(blk, name, params, tools):
                matched[i] = j
                break
    return matched


def is_valid(calls: list[CallBlock], gt: list[tuple[str, dict]], tools: dict[str, dict]) -> bool:
    """BFCL verdict: same number of calls and every ground-truth entry matched."""
    return len(calls) == len(gt) and len(match_calls(calls, gt, tools)) == len(gt)


def reply_problems(text: str, start: int, calls: list[CallBlock], gt: list[tuple[str, dict]],
                   tools: dict[str, dict], *, missing: bool = True) -> list[Problem]:
    """Problems of a reply's parsed calls against the ground truth (unmatched calls, then a missing one); `missing=False`: a call that did
    not parse is already the error, so no `missing_call` is reported."""
    matched = match_calls(calls, gt, tools)
    free_gt = [i for i in range(len(gt)) if i not in matched]
    free_calls = [j for j in range(len(calls)) if j not in matched.values()]
    out: list[Problem] = []
    for j in free_calls:
        blk = calls[j]
        if not free_gt:  # every ground-truth call is done: this one is extra
            out.append(Problem("extra_call", (blk.start, blk.start + len(OPEN)), [{"calls_needed": len(gt)}]))
            continue
        same = [i for i in free_gt if gt[i][0] == blk.name] or free_gt
        best = min(same, key=lambda i: len(call_problems(blk, *gt[i], tools)))
        out += call_problems(blk, *gt[best], tools)
        free_gt.remove(best)
    if missing and free_gt and len(calls) < len(gt):
        name = gt[free_gt[0]][0]
        hv = [{"expected": name, "remaining": len(gt) - len(calls)}, {"expected": "", "remaining": len(gt) - len(calls)}]
        out.append(Problem("missing_call", missing_call_span(text, start, calls), hv))
    return out


def missing_call_span(text: str, start: int, calls: list[CallBlock]) -> tuple[int, int] | None:
    """Where the turn ended a call too early: the last call's closing tag (or, never closed, its
    closing brace); with no call at all, the first line of the generated text (None if empty)."""
    if calls:
        last = calls[-1]
        return (last.end - len(CLOSE), last.end) if last.closed else (last.root.close_brace, last.root.end)
    a = start
    while a < len(text) and text[a].isspace():
        a += 1
    b = text.find("\n", a)
    b = len(text) if b < 0 else b
    return (a, min(b, a + 40)) if b > a else None
