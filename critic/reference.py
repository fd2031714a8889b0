"""Reference critic: compares the calls of the first assistant step with ground-truth calls.

Ground truth is `traj.meta["ground_truth"]` in BFCL's possible-answer format,
`[{"fn_name": {"param": [acceptable values...]}}]` (BFCL tasks and rollouts carry it). The
verdict follows BFCL's AST checker semantics (`bfcl_eval.eval_checker.ast_eval.ast_checker`):

- a call matches a ground-truth entry when the name is equal, every required parameter (from
  the tool schema) is present, every argument is declared by the schema AND listed in the
  ground truth, each value is of the schema type (an int is accepted for a number) and among
  the acceptable values, and every ground-truth parameter without `""` among its values is
  present (`""` = may be omitted);
- strings (also inside lists and dicts) compare after removing ` ,./-_*^`, lowercasing and
  turning `'` into `"`;
- the number of calls must equal the number of ground-truth entries, and calls are matched to
  entries in any order (greedily, entry by entry, like BFCL), so simple/multiple = exactly one
  call and parallel = any order.

When the step is wrong, the earliest problem in its text is reported:

| category          | quote (the error tokens; data/README.md defines them exactly)   |
|-------------------|-----------------------------------------------------------------|
| wrong_function    | the called name, without its quotes                             |
| wrong_value       | the value; a string of the right type without its quotes        |
| unknown_parameter | the key, without its quotes                                     |
| missing_required  | the `}` that closed the arguments instead                       |
| missing_call      | the last call's `</tool_call>` (the end of turn after it has no |
|                   | text); no call at all: the first line of the generated text     |
| extra_call        | the `<tool_call>` tag that opened the extra call                |
| invalid_json / unparsable_call | as in the schema critic                            |

Every critique carries `quote_at`; no quote starts inside the reply prefill.

Hints give the expected function, the correct value (an acceptable value that does not repeat
the wrong text) or the parameter to add.

    opsd critique --in rollouts.jsonl --out critiques.jsonl --critic reference
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from critic.base import RuleCritic
from critic.calls import (
    CLOSE,
    OPEN,
    CallBlock,
    Node,
    extract_calls,
    render_value,
    string_content_span,
)
from critic.schema import (
    call_issues,
    closing_span,
    key_name_span,
    name_span,
    tools_by_name,
)
from opsd.io.tasks.bfcl_multi_turn import is_multi_turn
from opsd.render import message_text, prefill_length
from opsd.types import Critique, Trajectory

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


class ReferenceCritic(RuleCritic):
    """Checks a reply against `meta.ground_truth` (see module docstring); several replies, or a BFCL multi-turn
    episode, are checked reply by reply by `critic.multi_turn` (the first wrong reply is reported)."""

    name = "reference"

    @staticmethod
    def applies(traj: Trajectory) -> bool:
        """Whether the trajectory carries ground truth to compare with (a BFCL multi-turn episode does)."""
        return "ground_truth" in traj.meta or is_multi_turn(traj.meta)

    @staticmethod
    def subsumes(traj: Trajectory) -> bool:
        """Multi-turn episodes and logs with several replies: this critic runs the schema checks itself, reply by
        reply (critic.multi_turn), so the first error is found whichever check finds it."""
        from critic import multi_turn

        return is_multi_turn(traj.meta) or multi_turn.is_multi_step(traj)

    def check(self, traj: Trajectory) -> Critique:
        from critic import multi_turn

        if is_multi_turn(traj.meta):  # every step of every turn: critic.multi_turn
            return multi_turn.check(self, traj)
        if multi_turn.is_multi_step(traj):  # several replies, one flat ground truth
            return multi_turn.check_steps(self, traj)
        if "ground_truth" not in traj.meta:
            return self.failed(traj, "trajectory has no meta.ground_truth; the reference critic needs it")
        try:
            gt = parse_ground_truth(traj.meta["ground_truth"])
        except ValueError as e:
            return self.failed(traj, str(e))
        step = next((i for i, m in enumerate(traj.messages) if m.get("role") == "assistant"), None)
        if step is None:
            return self.failed(traj, "trajectory has no assistant message to check")
        tools = tools_by_name(traj)
        text = message_text(traj.messages[step])
        start = prefill_length(traj, step)
        blocks = extract_calls(text)
        bad = [iss for b in blocks if not b.ok for iss in call_issues(text, b, tools, start)]
        calls = [b for b in blocks if b.ok]
        if len(calls) == len(blocks) and is_valid(calls, gt, tools):
            return self.ok(traj)
        problems = [Problem(i.category, i.span, i.hint_vars) for i in bad]
        problems += self._problems(text, start, calls, gt, tools, missing=len(calls) == len(blocks))
        return self.first_error(traj, step, text, start, problems)

    def _problems(self, text: str, start: int, calls: list[CallBlock], gt: list[tuple[str, dict]],
                  tools: dict[str, dict], *, missing: bool = True) -> list[Problem]:
        """Problems of the parsed calls against the ground truth; `missing=False`: a call that did
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
