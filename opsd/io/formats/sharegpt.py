"""ShareGPT / Hermes / LLaMA-Factory conversations -> opsd trajectory.

    {"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"tool"|"observation", "value": "..."}],
     "tools": [...] or "JSON string", "system": "optional system prompt"}

- Tool calls are `<tool_call>{"name", "arguments"}</tool_call>` blocks in `gpt` values (Hermes), or a
  `function_call` turn whose value is the call's JSON (an object, or a list for parallel calls).
- Tool results are `tool`/`observation` turns. A turn holding several `<tool_response>` blocks (Hermes
  datasets put all parallel results in ONE turn) becomes one tool message per block, matched to the
  pending calls in order.
- Tools come from `tools` (a list or a JSON string) or the system prompt's `<tools>...</tools>` block.
- Call ids are `call_<k>` (k counts the calls in the conversation); every error names the user's own
  turn and field (`$.conversations[3].value`), never a converted message.
"""
from __future__ import annotations

import json
import re

from opsd.io.formats import Converted, FormatError

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
TOOL_RESPONSE_RE = re.compile(r"<tool_response>\s*(.*?)\s*(?:</tool_response>|\Z)", re.S)
TOOLS_RE = re.compile(r"<tools>\s*(.*?)\s*</tools>", re.S)
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "function_call": "assistant", "tool": "tool", "observation": "tool", "function_response": "tool"}


def _call(obj, k: int) -> dict:
    """One {"name", "arguments"} object as an OpenAI tool call; ValueError if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("expected an object with a string 'name'")
    args = obj.get("arguments", obj.get("parameters", {}))
    args_s = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": f"call_{k}", "type": "function", "function": {"name": obj["name"], "arguments": args_s}}


def parse_tool_call_text(text: str) -> tuple[str, list[dict], list[str]]:
    """Split Hermes-style text into (remaining content, tool_calls, parse errors).

    Blocks that are not valid `{"name", "arguments"}` JSON stay in the content verbatim and are
    reported in the errors list, so nothing is lost.
    """
    calls, errors, kept = [], [], []
    last = 0
    for k, m in enumerate(TOOL_CALL_RE.finditer(text)):
        kept.append(text[last:m.start()])
        last = m.end()
        try:
            calls.append(_call(json.loads(m.group(1)), k))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            errors.append(f"tool call {k}: {e}")
            kept.append(m.group(0))
    kept.append(text[last:])
    return "".join(kept).strip(), calls, errors


def _tools_from_system(value: str, path: str) -> list | None:
    blocks = [b for b in TOOLS_RE.findall(value) if b.strip()]  # skip prose like "<tools></tools> tags"
    if not blocks:
        return None
    raw = blocks[-1]
    try:
        tools = json.loads(raw if raw.lstrip().startswith("[") else "[" + ",".join(raw.split("\n")) + "]")
    except json.JSONDecodeError as e:
        raise FormatError(path, f"a <tools> block of JSON tool schemas (one per line or a JSON list); "
                                f"it is not JSON: {e.msg} at column {e.colno}") from None
    return tools


def _tools(tools, path: str) -> list[dict]:
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError as e:
            raise FormatError(path, f"a JSON list of tool schemas; the string is not JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(tools, list):
        raise FormatError(path, f"a list of tool schemas, got {type(tools).__name__}")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise FormatError(f"{path}[{i}]", f"a tool schema object, got {type(t).__name__}")
        out.append(t if "function" in t else {"type": "function", "function": t})
    return out


def _function_call_turn(value: str, first: int, path: str) -> list[dict]:
    """LLaMA-Factory `function_call` turn: the call's JSON (object or list) without tags."""
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise FormatError(path, f'a tool call as JSON ({{"name", "arguments"}} or a list of them) or '
                                f"<tool_call> blocks; not JSON: {e.msg} at column {e.colno}") from None
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for j, item in enumerate(items):
        try:
            calls.append(_call(item, first + j))
        except ValueError as e:
            raise FormatError(path, f"tool call {j}: {e}") from None
    return calls


def _split_responses(value: str, path: str) -> list[str]:
    """The results in one tool turn: one per <tool_response> block, or the whole value if it has none."""
    blocks = list(TOOL_RESPONSE_RE.finditer(value))
    if not blocks:
        return [value]
    outside = TOOL_RESPONSE_RE.sub("", value).replace("</tool_response>", "").strip()
    if outside:
        raise FormatError(path, f"only <tool_response> blocks in a tool turn that has any; text outside them: {outside[:60]!r}")
    return [m.group(1) for m in blocks]


def convert(obj: dict) -> Converted:
    """A ShareGPT record (already checked against sharegpt.schema.json) -> trajectory dict + origins."""
    messages: list[dict] = []
    origins: list[str] = []
    pending: list[str] = []  # ids of calls not yet answered, in order
    n_calls = 0
    tools = _tools(obj["tools"], "$.tools") if obj.get("tools") is not None else None
    tools_origin = "$.tools"
    meta = {k: v for k, v in obj.items() if k not in ("id", "conversations", "tools", "system")}
    turns = [(t["from"], t["value"], f"$.conversations[{i}].value") for i, t in enumerate(obj["conversations"])]
    if isinstance(obj.get("system"), str) and obj["system"] and turns[0][0] != "system":
        turns.insert(0, ("system", obj["system"], "$.system"))  # LLaMA-Factory keeps the system prompt apart
    for source, value, path in turns:
        role = ROLES[source]
        if role == "system" and tools is None:
            found = _tools_from_system(value, path)
            tools = _tools(found, path) if found is not None else None
            tools_origin = path
        if role == "assistant":
            content, calls, errors = parse_tool_call_text(value)
            if not calls and not errors and source == "function_call":
                content, calls = "", _function_call_turn(value, n_calls, path)
            for c in calls:
                c["id"] = f"call_{n_calls}"
                n_calls += 1
                pending.append(c["id"])
            msg = {"role": "assistant", "content": content}
            if calls:
                msg["tool_calls"] = calls
            if errors:
                meta.setdefault("parse_errors", []).append({"path": path, "errors": errors})
            messages.append(msg)
            origins.append(path)
        elif role == "tool":
            for k, text in enumerate(_split_responses(value, path)):
                if not pending:
                    what = f"result {k + 1} of this turn" if k else "this tool result"
                    raise FormatError(path, f"a tool result answering an earlier tool call; {what} has no "
                                            f"unanswered call before it ({n_calls} call(s) made so far)")
                messages.append({"role": "tool", "tool_call_id": pending.pop(0), "content": text})
                origins.append(path)
        else:
            messages.append({"role": role, "content": value})
            origins.append(path)
    traj = {"id": obj.get("id"), "messages": messages, "tools": tools or [], "meta": meta}
    return Converted(traj, origins, tools_origin)
