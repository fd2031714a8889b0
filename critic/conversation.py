"""Checks of a tool call against the conversation before it (part of the `schema` critic; no schema needed).

| category        | what is wrong                                                         | quote              |
|-----------------|-----------------------------------------------------------------------|--------------------|
| repeated_call   | a valid call identical to one whose (non-error) result is already above, with no user turn between | the call's opening tag or name |
| made_up_value   | an email, id-like value or amount found nowhere before the step (messages, tool results, schemas) | the value |

Conservative on purpose: a value counts as made up only when it has the shape of an identifier, an address
or an amount and occurs nowhere earlier, so clean logs get no new flags.
"""
from __future__ import annotations

import json
import re

from opsd_critic.calls import CallBlock, Issue, extract_calls, name_span, string_content_span
from opsd.render import message_text
from opsd.types import Trajectory

_EMAIL_RE = re.compile(r"^[\w.+-]+@[\w-]+(\.[\w-]+)+$")
_CODE_RE = re.compile(r"^[A-Za-z]{1,8}[-_#]?\d{3,}[A-Za-z0-9-]*$")  # ORD-1042, A12345, INV_2031: letters, then digits
_ID_WORDS = {"id", "ids", "number", "no", "code", "ref", "reference", "sku", "tracking"}  # a parameter name's last word
_AMOUNT_WORDS = {"amount", "price", "total", "cost", "fee", "balance", "refund", "payment"}
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")
_MIN_ID_CHARS = 3  # shorter values (1, 2, "A1") coincide too easily to call them made up
_ERROR_TEXT_RE = re.compile(r"\s*(error|exception|traceback \(most recent call last\))\b", re.I)


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


def _call_key(name, args) -> str:
    return json.dumps([name, args], sort_keys=True, ensure_ascii=False)


def _tag_or_name(blk: CallBlock, start: int) -> tuple[int, int]:
    """The decision to call at all: the `<tool_call>` tag when the model wrote it, else the name."""
    return (blk.start, blk.start + len("<tool_call>")) if blk.start >= start else name_span(blk)


def answered_calls(traj: Trajectory, step: int) -> set[str]:
    """Keys (name + arguments) of the calls before `step` whose result is in the conversation, since the last user
    turn, and was not an error: calling one of them again learns nothing new. A tool result answers the call with
    its `tool_call_id`, else the call in its position among the step's results."""
    answered: set[str] = set()
    calls: list[CallBlock] = []
    ids: list = []
    n_results = 0
    for m in traj.messages[:step]:
        role = m.get("role")
        if role == "user":
            answered.clear()  # a new request may ask for the same call again ("check again")
            calls = []
        elif role == "assistant":
            calls = extract_calls(message_text(m))
            ids = [c.get("id") if isinstance(c, dict) else None for c in m.get("tool_calls") or []]
            n_results = 0
        elif role == "tool" and calls:
            k = ids.index(m["tool_call_id"]) if m.get("tool_call_id") in ids else n_results
            n_results += 1
            if k < len(calls) and calls[k].ok and tool_result_error(m.get("content")) is None:
                answered.add(_call_key(calls[k].name, calls[k].args.value))
    return answered


def repeated_call_issues(traj: Trajectory, step: int, blocks: list[CallBlock], start: int) -> list[Issue]:
    """A `repeated_call` issue for the first call of `step` identical to an answered one (`answered_calls`)."""
    answered = answered_calls(traj, step)
    for blk in blocks:
        if _call_key(blk.name, blk.args.value) in answered:
            span = _tag_or_name(blk, start)
            return [Issue(span[0], "repeated_call", span, [{"function": blk.name}, {"function": ""}])]
    return []


def context_text(traj: Trajectory, step: int) -> str:
    """Everything the model could take a value from before `step`: every earlier message (tool results included)
    and the tool schemas."""
    parts = [message_text(m) if m.get("role") == "assistant" else str(m.get("content") or "")
             for m in traj.messages[:step]]
    return "\n".join(parts + [json.dumps(traj.tools, ensure_ascii=False)])


def _numbers(text: str) -> set[float]:
    return {float(x.replace(",", "")) for x in _NUMBER_RE.findall(text)}


def _last_word(key: str) -> str:
    """The last word of a parameter name: order_id -> id, orderId -> id, refund_amount -> amount."""
    words = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", key)
    return words[-1].lower() if words else ""


def _made_up_kind(key: str, value) -> str | None:
    """Which kind of value that must come from somewhere this is: "email", "id", "amount", or None."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    word = _last_word(key)
    if isinstance(value, str):
        v = value.strip()
        if _EMAIL_RE.match(v):
            return "email"
        if _CODE_RE.match(v) or (word in _ID_WORDS and len(v) >= _MIN_ID_CHARS and any(ch.isdigit() for ch in v)):
            return "id"
        return None
    if word in _ID_WORDS and isinstance(value, int) and abs(value) >= 10 ** (_MIN_ID_CHARS - 1):
        return "id"
    if word in _AMOUNT_WORDS and value != 0:
        return "amount"
    return None


def _found(kind: str, value, context: str, numbers: set[float]) -> bool:
    if kind == "amount" or (kind == "id" and not isinstance(value, str)):
        return float(value) in numbers
    return _mentions(context, str(value))


def made_up_issues(traj: Trajectory, step: int, blocks: list[CallBlock]) -> list[Issue]:
    """A `made_up_value` issue for each top-level argument of `step`'s calls that is an email address, an id-like
    value or an amount (`_made_up_kind`) occurring nowhere before the step (`context_text`)."""
    context = context_text(traj, step)
    numbers = _numbers(context)
    issues = []
    for blk in blocks:
        for key, f in blk.args.fields.items():
            kind = _made_up_kind(key, f.value.value)
            if kind is not None and not _found(kind, f.value.value, context, numbers):
                issues.append(Issue(f.value.start, "made_up_value", string_content_span(f.value),
                                    [{"function": blk.name, "parameter": key}, {"function": "", "parameter": ""}]))
    return issues
