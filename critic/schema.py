"""Schema critic: checks every tool call against the trajectory's tools and reports the first error.

Assistant steps are read in order; within a step, the error that starts earliest in the step's
rendered text wins (later text is already conditioned on it). Categories and quotes:

| category             | what                                              | quote (the error tokens)                |
|----------------------|---------------------------------------------------|-----------------------------------------|
| unknown_tool         | name not among the tools                          | the name, without its quotes            |
| invalid_json         | complete `<tool_call>` block that is not JSON     | the token at the decoder's error point  |
| unparsable_call      | block never closed (truncated) or not a call obj  | the token at the decoder's error point; |
|                      |                                                   | cut off: the last generated token       |
| unknown_parameter    | argument key the function does not declare        | the key, without its quotes             |
| missing_required     | required parameter absent                         | the `}` that closed the object instead  |
| type_mismatch        | value of the wrong JSON type                      | the value, whole (`"three"`)            |
| enum_violation       | value outside `enum`/`const`                      | the value (a string without its quotes) |
| constraint_violation | other schema rules (minimum, pattern, ...)        | the value (a string without its quotes) |
| tool_error           | a tool result reports an error for a valid call   | the value the error names, else the     |
|                      |                                                   | arguments object                        |
| repeated_call        | a valid call identical (name and arguments) to an | the `<tool_call>` tag the model wrote,  |
|                      | earlier one whose result is already above, with   | else the name                           |
|                      | no user turn and no error result in between       |                                         |
| made_up_value        | an email address, an id-like string (letters then | the value (a string without its quotes) |
|                      | 3+ digits, or digits under an id-named parameter) |                                         |
|                      | an amount under an amount-named parameter, that   |                                         |
|                      | occurs nowhere before: not in the system prompt,  |                                         |
|                      | a user turn, a tool result, an earlier reply or   |                                         |
|                      | the tool schemas                                  |                                         |

The last two are checked only in a step whose calls are all valid against the schemas, and are
conservative: a value found anywhere before (as a whole word, numbers compared by value) is
never flagged, and a call repeated after a new user turn or after an error result is allowed.

data/README.md ("Which tokens a quote covers") defines these exactly. Every critique carries
`quote_at`, the quote's offset in the step text, so a quote need not be unique; no quote
starts inside the step's forced reply prefill (`opsd.render.prefill_length`). Hints come from
`prompts/hints/<category>.j2` and never repeat the quoted text.

    opsd critique --in data/sample_openai.jsonl --out critiques.jsonl --critic schema
"""
from __future__ import annotations

import re
import jsonschema

from opsd_critic.base import RuleCritic
from opsd_critic.calls import (
    Issue,
    name_span,
    CallBlock,
    Node,
    extract_calls,
    json_error_span,
    render_value,
    string_content_span,
)
from opsd_critic.conversation import _mentions, made_up_issues, repeated_call_issues, tool_result_error
from opsd.render import message_text, prefill_length
from opsd.types import Critique, Trajectory

_PRIORITY = {c: k for k, c in enumerate(("unparsable_call", "invalid_json", "unknown_tool", "unknown_parameter",
                                          "type_mismatch", "enum_violation", "constraint_violation",
                                          "missing_required", "repeated_call", "made_up_value", "tool_error"))}
_MAX_LISTED = 12


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
    """Decision point where an object was closed too early: its closing brace."""
    return obj.close_brace, obj.end


def _type_names(t) -> str:
    names = {"object": "an object", "array": "a list", "string": "a string", "integer": "an integer",
             "number": "a number", "boolean": "true or false", "null": "null"}
    ts = t if isinstance(t, list) else [t]
    return " or ".join(names.get(x, str(x)) for x in ts)


def call_issues(text: str, blk: CallBlock, tools: dict[str, dict], start: int = 0) -> list[Issue]:
    """All schema problems of one `<tool_call>` block (`start`: where the generated text begins)."""
    if not blk.ok:
        pos = blk.error_pos if blk.error_pos is not None else blk.start
        category = "invalid_json" if blk.closed and blk.root is None else "unparsable_call"
        problem = blk.error.rstrip(".")
        if not blk.closed:
            problem += "; the call was never closed"
        # most informative first; the `plain` variants name no JSON key (the quote may be one)
        hv = [{"problem": p, "plain": plain} for plain in (False, True) for p in (problem, "")]
        span = json_error_span(text, pos, start)  # None: nothing generated to quote (first_error fails it)
        issues = [Issue(pos, category, span, hv)]
        if blk.name is not None and blk.name_span and blk.name not in tools:
            # the name came first and was already wrong: that is the error to train on
            issues.append(Issue(blk.name_span[0], "unknown_tool", name_span(blk),
                                [{"valid_tools": v} for v in _listed(sorted(tools))]))
        elif blk.name in tools:
            issues += partial_argument_issues(text, blk, tools[blk.name], start)
        return issues
    fn = tools.get(blk.name)
    if fn is None:
        return [Issue(blk.name_span[0], "unknown_tool", name_span(blk),
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
            issues.append(Issue(f.key_span[0], "unknown_parameter", key_name_span(f),
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


_ARGS_OPEN_RE = re.compile(r'"arguments"\s*:\s*([\[{])')


def partial_keys(text: str, open_pos: int) -> list[tuple[str, int]]:
    """Keys (name, position of the name) at the top level of the JSON object opened at `open_pos` (`{`), read
    as far as the text goes: the object may never be closed (a reply cut off at the token limit)."""
    keys, depth, i, n = [], 0, open_pos, len(text)
    expect_key = False
    while i < n:
        ch = text[i]
        if ch == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                break  # an unterminated string: the text ends inside it
            if depth == 1 and expect_key and re.match(r"\s*:", text[j + 1:]):
                keys.append((text[i + 1:j], i + 1))
            expect_key = False
            i = j + 1
            continue
        if ch in "{[":
            depth += 1
            expect_key = ch == "{" and depth == 1
        elif ch in "}]":
            depth -= 1
            if depth <= 0:
                break
        elif ch == "," and depth == 1:
            expect_key = True
        i += 1
    return keys


def partial_argument_issues(text: str, blk: CallBlock, fn: dict, start: int = 0) -> list[Issue]:
    """Errors inside the arguments of a call that never parsed (cut off, or broken later): arguments that are a
    list instead of an object, or the first key the function does not declare (the model echoing the tool's
    schema, `"type": "function", ...`, is the common case). They start before the point where decoding failed,
    so they are the error to train on, not the token at the cut-off."""
    if blk.name_span is None:
        return []
    m = _ARGS_OPEN_RE.search(text, blk.name_span[1], blk.end)
    if m is None or m.start(1) < start:
        return []
    name = blk.name
    props = list(((fn.get("parameters") or {}).get("properties") or {}))
    if m.group(1) == "[":
        return [Issue(m.start(1), "type_mismatch", (m.start(1), m.start(1) + 1),
                      [{"function": name, "parameter": "arguments", "expected": "an object"}])]
    for key, pos in partial_keys(text, m.start(1)):
        if key not in props:
            if not key:
                return []
            return [Issue(pos, "unknown_parameter", (pos, pos + len(key)),
                          [{"function": name, "valid_parameters": v} for v in _listed(props)])]
    return []


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
        return [Issue(f.key_span[0], "unknown_parameter", key_name_span(f),
                      [{"function": fn_name, "valid_parameters": allowed}])
                for k, f in node.fields.items() if k not in allowed]
    if v == "additionalProperties":
        return []
    span = (node.start, node.end)  # a wrong type: the whole value (a string's opening quote is wrong too)
    if v == "type":
        return [Issue(node.start, "type_mismatch", span,
                      [{"function": fn_name, "parameter": param, "expected": _type_names(e.validator_value)}])]
    if v in ("anyOf", "oneOf"):
        types = [s.get("type") for s in e.validator_value if isinstance(s, dict) and s.get("type")]
        if types:
            return [Issue(node.start, "type_mismatch", span,
                          [{"function": fn_name, "parameter": param, "expected": _type_names(types)}])]
    span = string_content_span(node)  # a value of the right type: a string's quotes are right
    if v in ("enum", "const"):
        allowed = e.validator_value if v == "enum" else [e.validator_value]
        shown = [render_value(a) for a in allowed]
        return [Issue(node.start, "enum_violation", span,
                      [{"function": fn_name, "parameter": param, "allowed": a} for a in _listed(shown)]
                      + [{"function": fn_name, "parameter": param, "allowed": []}])]
    constraint = f"{v} {render_value(e.validator_value)}"[:80]
    return [Issue(node.start, "constraint_violation", span,
                  [{"function": fn_name, "parameter": param, "constraint": constraint},
                   {"function": fn_name, "parameter": param, "constraint": ""}])]


def key_name_span(f) -> tuple[int, int]:
    """An object key without its quotes (the quotes are right; the name is the error); empty: its closing quote."""
    a, b = f.key_span
    return (a + 1, b - 1) if b - a > 2 else (b - 1, b)


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
            start = prefill_length(traj, i)
            issues = [iss for b in blocks for iss in call_issues(text, b, tools, start)]
            if not issues and all(b.ok for b in blocks):
                issues = (repeated_call_issues(traj, i, blocks, start) + made_up_issues(traj, i, blocks)
                          + self._tool_errors(traj, i, blocks, tools))
            if issues or not all(b.ok for b in blocks):
                return self.first_error(traj, i, text, start, issues, _PRIORITY)
        return self.ok(traj)

    def _tool_errors(self, traj: Trajectory, step: int, blocks: list[CallBlock], tools: dict[str, dict]) -> list[Issue]:
        """A `tool_error` issue for the first call of `step` whose result reports an error.

        Every call of the step is valid here (unknown keys were reported before), so the error
        names a value, or else the whole arguments object is quoted (the name when it has none).
        """
        msg = traj.messages[step]
        ids = [c.get("id") for c in msg.get("tool_calls") or []]
        for m in traj.messages[step + 1:]:
            if m.get("role") != "tool":
                break
            err = tool_result_error(m.get("content"))
            if err is None:
                continue
            k = ids.index(m["tool_call_id"]) if m.get("tool_call_id") in ids else 0
            blk = blocks[min(k, len(blocks) - 1)]
            props = (tools[blk.name].get("parameters") or {}).get("properties") or {}
            valid = list(props)
            for key, f in blk.args.fields.items():  # a value the error names
                if isinstance(f.value.value, (str, int, float)) and not isinstance(f.value.value, bool) \
                        and _mentions(err, str(f.value.value)):
                    desc = str((props.get(key) or {}).get("description") or "")[:120]
                    return [Issue(f.value.start, "tool_error", string_content_span(f.value),
                                  [{"function": blk.name, "parameter": key, "valid_parameters": valid, "description": desc},
                                   {"function": blk.name, "parameter": key, "valid_parameters": valid, "description": ""},
                                   {"function": "", "parameter": key, "valid_parameters": [], "description": ""}])]
            span = (blk.args.start, blk.args.end) if blk.args.end > blk.args.start else name_span(blk)
            return [Issue(span[0], "tool_error", span,
                          [{"function": blk.name, "parameter": "", "valid_parameters": valid, "description": ""},
                           {"function": blk.name, "parameter": "", "valid_parameters": [], "description": ""}])]
        return []


# ---------------------------------------------------------------- repeated calls, made-up values
