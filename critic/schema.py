"""Schema critic: checks every tool call against the trajectory's tools and reports the first error.

Assistant steps are read in order; within a step, the error that starts earliest in the step's
rendered text wins (later text is already conditioned on it). Categories and quotes:

| category             | what                                              | quote                                  |
|----------------------|---------------------------------------------------|----------------------------------------|
| unknown_tool         | name not among the tools                          | the name                               |
| invalid_json         | complete `<tool_call>` block that is not JSON     | text around the decoder's error point  |
| unparsable_call      | block never closed (truncated) or not a call obj  | text around the decoder's error point  |
| unknown_parameter    | argument key the function does not declare        | the key, e.g. `"rate"`                 |
| missing_required     | required parameter absent                         | last value + closing brace (where the  |
|                      |                                                   | model closed the object instead)       |
| type_mismatch        | value of the wrong JSON type                      | the value as rendered                  |
| enum_violation       | value outside `enum`/`const`                      | the value as rendered                  |
| constraint_violation | other schema rules (minimum, pattern, ...)        | the value as rendered                  |
| tool_error           | a tool result reports an error for a valid call   | the argument the error names, else the |
|                      |                                                   | arguments object                       |

Every quote is widened until it is unique in the step text. Hints come from
`prompts/hints/<category>.j2` and never repeat the quoted text.

    opsd critique --in data/sample_openai.jsonl --out critiques.jsonl --critic schema
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import jsonschema

from critic.base import RuleCritic
from critic.calls import (
    CallBlock,
    Node,
    extract_calls,
    json_error_span,
    render_value,
    unique_quote,
)
from opsd.render import message_text
from opsd.types import Critique, Trajectory

_PRIORITY = {c: k for k, c in enumerate(("unparsable_call", "invalid_json", "unknown_tool", "unknown_parameter",
                                          "type_mismatch", "enum_violation", "constraint_violation",
                                          "missing_required", "tool_error"))}
_MAX_LISTED = 12
_ERROR_TEXT_RE = re.compile(r"\s*(error|exception|traceback \(most recent call last\))\b", re.I)


@dataclass
class Issue:
    """One problem found in a step: where it starts, its category, the quote span, hint variants."""

    pos: int
    category: str
    span: tuple[int, int]
    hint_vars: list[dict]


def tools_by_name(traj: Trajectory) -> dict[str, dict]:
    """{name: function dict} of the trajectory's tools (accepts bare function dicts too)."""
    out = {}
    for t in traj.tools:
        fn = t.get("function", t)
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn
    return out


def _listed(names: list[str]) -> list[list[str]]:
    """Variants of a name list for hints: all, then truncated."""
    if len(names) <= _MAX_LISTED:
        return [names, names[:6] + ["..."]] if len(names) > 6 else [names]
    return [names[:_MAX_LISTED] + ["..."], names[:6] + ["..."]]


def node_at(root: Node, path) -> Node | None:
    node = root
    for p in path:
        if isinstance(p, int) and p < len(node.items):
            node = node.items[p]
        elif isinstance(p, str) and p in node.fields:
            node = node.fields[p].value
        else:
            return None
    return node


def _param_name(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "arguments"


def closing_span(obj: Node) -> tuple[int, int]:
    """Decision point where an object was closed: its last value through the closing brace."""
    if obj.fields:
        last = list(obj.fields.values())[-1]
        return last.value.start, obj.end
    return obj.start, obj.end


def _type_names(t) -> str:
    names = {"object": "an object", "array": "a list", "string": "a string", "integer": "an integer",
             "number": "a number", "boolean": "true or false", "null": "null"}
    ts = t if isinstance(t, list) else [t]
    return " or ".join(names.get(x, str(x)) for x in ts)


def call_issues(text: str, blk: CallBlock, tools: dict[str, dict]) -> list[Issue]:
    """All schema problems of one `<tool_call>` block."""
    if not blk.ok:
        pos = blk.error_pos if blk.error_pos is not None else blk.start
        category = "invalid_json" if blk.closed and blk.root is None else "unparsable_call"
        problem = blk.error.rstrip(".")
        if not blk.closed:
            problem += "; the call was never closed"
        hv = [{"function": blk.name or "", "problem": problem, "valid_tools": list(tools)},
              {"function": blk.name or "", "problem": "", "valid_tools": list(tools)}]
        span = json_error_span(text, pos, blk.end)
        if text.startswith('"', pos):  # a key or an unterminated string starts here: quote its opening
            close = text.find('"', pos + 1, min(pos + 40, blk.end))
            span = (pos, close + 1 if close > 0 else min(pos + 12, blk.end))
        issues = [Issue(pos, category, span, hv)]
        if blk.name is not None and blk.name_span and blk.name not in tools:
            # the name came first and was already wrong: that is the error to train on
            issues.append(Issue(blk.name_span[0], "unknown_tool", blk.name_span,
                                [{"valid_tools": v} for v in _listed(sorted(tools))]))
        return issues
    fn = tools.get(blk.name)
    if fn is None:
        return [Issue(blk.name_span[0], "unknown_tool", blk.name_span,
                      [{"valid_tools": v} for v in _listed(sorted(tools))])]
    args = blk.args
    name = blk.name
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not args.is_object:
        return [Issue(args.start, "type_mismatch", (args.start, max(args.end, args.start + 1)),
                      [{"function": name, "parameter": "arguments", "expected": "an object"}])]
    issues: list[Issue] = []
    props = params.get("properties") or {}
    for key, f in args.fields.items():  # unknown keys at the top level, declared or not by additionalProperties
        if key not in props:
            issues.append(Issue(f.key_span[0], "unknown_parameter", f.key_span,
                                [{"function": name, "valid_parameters": v} for v in _listed(list(props))]))
    try:
        cls = jsonschema.validators.validator_for(params)
        errors = list(cls(params).iter_errors(args.value))
    except jsonschema.exceptions.SchemaError as e:
        return issues + [Issue(args.start, "constraint_violation", (args.start, args.end),
                               [{"function": name, "parameter": "arguments", "constraint": f"a valid schema ({e.message})"}])]
    for e in errors:
        issues += _schema_issue(e, args, name)
    return issues


def _schema_issue(e: jsonschema.ValidationError, args: Node, fn_name: str) -> list[Issue]:
    path = list(e.absolute_path)
    node = node_at(args, path)
    if node is None:
        return []
    v, param = e.validator, _param_name(path)
    if v == "required":
        missing = [r for r in e.validator_value if isinstance(e.instance, dict) and r not in e.instance]
        if not missing:
            return []
        sub = (e.schema.get("properties") or {}).get(missing[0]) or {}
        full = _param_name(path + [missing[0]])
        desc, typ = str(sub.get("description") or "")[:120], sub.get("type", "")
        typ = typ if isinstance(typ, str) else "/".join(typ)
        span = closing_span(node)
        return [Issue(node.close_brace, "missing_required", span,
                      [{"function": fn_name, "parameter": full, "description": desc, "type": typ, "value": ""},
                       {"function": fn_name, "parameter": full, "description": "", "type": typ, "value": ""},
                       {"function": fn_name, "parameter": full, "description": "", "type": "", "value": ""}])]
    if v == "additionalProperties" and path:  # nested objects; the top level is checked by name
        allowed = list((e.schema.get("properties") or {}).keys())
        return [Issue(f.key_span[0], "unknown_parameter", f.key_span,
                      [{"function": fn_name, "valid_parameters": allowed}])
                for k, f in node.fields.items() if k not in allowed]
    if v == "additionalProperties":
        return []
    span = (node.start, node.end)
    if v == "type":
        return [Issue(node.start, "type_mismatch", span,
                      [{"function": fn_name, "parameter": param, "expected": _type_names(e.validator_value)}])]
    if v in ("anyOf", "oneOf"):
        types = [s.get("type") for s in e.validator_value if isinstance(s, dict) and s.get("type")]
        if types:
            return [Issue(node.start, "type_mismatch", span,
                          [{"function": fn_name, "parameter": param, "expected": _type_names(types)}])]
    if v in ("enum", "const"):
        allowed = e.validator_value if v == "enum" else [e.validator_value]
        shown = [render_value(a) for a in allowed]
        return [Issue(node.start, "enum_violation", span,
                      [{"function": fn_name, "parameter": param, "allowed": a} for a in _listed(shown)])]
    constraint = f"{v} {render_value(e.validator_value)}"[:80]
    return [Issue(node.start, "constraint_violation", span,
                  [{"function": fn_name, "parameter": param, "constraint": constraint}])]


def tool_result_error(content) -> str | None:
    """The error a tool result reports, or None. JSON {"error": ...}/{"status": "error"} or 'Error: ...' text."""
    s = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    try:
        obj = json.loads(s)
    except (json.JSONDecodeError, TypeError):
        obj = None
    if isinstance(obj, dict):
        for k in ("error", "errors", "exception"):
            if obj.get(k):
                return str(obj[k])[:300]
        if str(obj.get("status", "")).lower() in ("error", "failed", "failure"):
            return str(obj.get("message") or obj.get("detail") or "status: error")[:300]
        return None
    if s and _ERROR_TEXT_RE.match(s):
        return s.strip()[:300]
    return None


def _mentions(message: str, needle: str) -> bool:
    needle = needle.strip().casefold()
    return bool(needle) and re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", message.casefold()) is not None


class SchemaCritic(RuleCritic):
    """Checks tool calls against the trajectory's tool schemas (see module docstring)."""

    name = "schema"

    def check(self, traj: Trajectory) -> Critique:
        tools = tools_by_name(traj)
        msgs = traj.messages
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            text = message_text(m)
            blocks = extract_calls(text)
            if not blocks:
                continue
            if not tools:
                return self.failed(traj, f"message {i} calls tools but the trajectory declares no tools to check against")
            issues = [iss for b in blocks for iss in call_issues(text, b, tools)]
            if not issues:
                issues = self._tool_errors(traj, i, text, blocks, tools)
            if issues:
                iss = min(issues, key=lambda x: (x.pos, _PRIORITY.get(x.category, 99)))
                quote = unique_quote(text, *iss.span)
                hint = self.hint(iss.category, quote, *iss.hint_vars)
                return self.error(traj, i, quote, hint, iss.category)
        return self.ok(traj)

    def _tool_errors(self, traj: Trajectory, step: int, text: str, blocks: list[CallBlock],
                     tools: dict[str, dict]) -> list[Issue]:
        """A `tool_error` issue for the first call of `step` whose result reports an error."""
        msg = traj.messages[step]
        ids = [c.get("id") for c in msg.get("tool_calls") or []]
        good = [b for b in blocks if b.ok]
        for m in traj.messages[step + 1:]:
            if m.get("role") != "tool":
                break
            err = tool_result_error(m.get("content"))
            if err is None:
                continue
            k = ids.index(m["tool_call_id"]) if m.get("tool_call_id") in ids else 0
            if not good:
                return []
            blk = good[min(k, len(good) - 1)]
            fn = tools[blk.name]
            props = (fn.get("parameters") or {}).get("properties") or {}
            valid = list(props)
            for key, f in blk.args.fields.items():  # a value the error names
                if isinstance(f.value.value, (str, int, float)) and not isinstance(f.value.value, bool) \
                        and _mentions(err, str(f.value.value)):
                    desc = str((props.get(key) or {}).get("description") or "")[:120]
                    return [Issue(f.value.start, "tool_error", (f.value.start, f.value.end),
                                  [{"function": blk.name, "parameter": key, "valid_parameters": valid, "description": desc},
                                   {"function": blk.name, "parameter": key, "valid_parameters": valid, "description": ""}])]
            for key, f in blk.args.fields.items():  # an undeclared key the error names
                if key not in props and _mentions(err, key):
                    return [Issue(f.key_span[0], "tool_error", f.key_span,
                                  [{"function": blk.name, "parameter": "", "valid_parameters": valid, "description": ""}])]
            span = (blk.args.start, blk.args.end) if blk.args.end > blk.args.start else blk.name_span
            return [Issue(span[0], "tool_error", span,
                          [{"function": blk.name, "parameter": "", "valid_parameters": valid, "description": ""}])]
        return []
