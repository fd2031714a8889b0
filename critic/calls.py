"""Tool calls as they appear in a step's rendered text, with source positions.

Critics quote the text the model produced (`opsd.render.message_text`), so they must know where
each call, name, key and value sits in that text. This module parses the Hermes-style
`<tool_call>...</tool_call>` blocks of a step with a small position-tracking JSON parser:

    blocks = extract_calls(text)
    b = blocks[0]
    b.name, b.name_span           # function name and its [start, end) in `text` (no quotes)
    b.args.fields["city"]          # Field(key_span, value: Node) with absolute positions
    json_error_span(text, pos, start)  # the error tokens of a call that is not valid JSON

The text is the ground truth: for a rollout message (raw generated text) the parsed
`tool_calls` may be missing, so critics never rely on them. Nothing here executes anything.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from json.decoder import scanstring
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_WS = " \t\n\r"
_NUMBER_RE = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None}


class JsonPosError(ValueError):
    """Invalid JSON at absolute position `pos` of the step text."""

    def __init__(self, msg: str, pos: int):
        self.msg, self.pos = msg, pos
        super().__init__(f"{msg} (char {pos})")


@dataclass
class Node:
    """A parsed JSON value with its [start, end) span in the step text.

    Objects keep `fields` (key -> Field) in source order; arrays keep `items`.
    """

    value: Any
    start: int
    end: int
    fields: dict[str, "Field"] = field(default_factory=dict)
    items: list["Node"] = field(default_factory=list)

    @property
    def is_object(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def close_brace(self) -> int:
        """Position of the closing `}`/`]` of an object/array."""
        return self.end - 1


@dataclass
class Field:
    key: str
    key_span: tuple[int, int]  # includes the key's quotes
    value: Node


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def parse_value(s: str, i: int, dups: list | None = None) -> Node:
    """Parse one JSON value starting at `i` (after whitespace). Raises JsonPosError.

    Key spans that repeat a key of the same object are appended to `dups` (a repetition loop).
    """
    i = _skip_ws(s, i)
    if i >= len(s):
        raise JsonPosError("expecting a value, text ended", i)
    c = s[i]
    if c == "{":
        node = Node({}, i, i)
        j = _skip_ws(s, i + 1)
        if j < len(s) and s[j] == "}":
            node.end = j + 1
            return node
        while True:
            j = _skip_ws(s, j)
            if j >= len(s) or s[j] != '"':
                raise JsonPosError("expecting a property name in double quotes", j)
            key, kend = _string(s, j)
            k = _skip_ws(s, kend)
            if k >= len(s) or s[k] != ":":
                raise JsonPosError("expecting ':' after a property name", k)
            if key in node.fields and dups is not None:
                dups.append((j, kend))
            val = parse_value(s, k + 1, dups)
            node.fields[key] = Field(key, (j, kend), val)
            node.value[key] = val.value
            j = _skip_ws(s, val.end)
            if j < len(s) and s[j] == ",":
                j += 1
                continue
            if j < len(s) and s[j] == "}":
                node.end = j + 1
                return node
            raise JsonPosError("expecting ',' or '}' in an object", j)
    if c == "[":
        node = Node([], i, i)
        j = _skip_ws(s, i + 1)
        if j < len(s) and s[j] == "]":
            node.end = j + 1
            return node
        while True:
            val = parse_value(s, j, dups)
            node.items.append(val)
            node.value.append(val.value)
            j = _skip_ws(s, val.end)
            if j < len(s) and s[j] == ",":
                j += 1
                continue
            if j < len(s) and s[j] == "]":
                node.end = j + 1
                return node
            raise JsonPosError("expecting ',' or ']' in an array", j)
    if c == '"':
        v, end = _string(s, i)
        return Node(v, i, end)
    m = _NUMBER_RE.match(s, i)  # never empty: a number has a digit
    if m:
        txt = m.group(0)
        v = float(txt) if any(ch in txt for ch in ".eE") else int(txt)
        return Node(v, i, m.end())
    for lit, v in _LITERALS.items():
        if s.startswith(lit, i):
            return Node(v, i, i + len(lit))
    raise JsonPosError("expecting a JSON value", i)


def _string(s: str, i: int) -> tuple[str, int]:
    try:
        return scanstring(s, i + 1, True)
    except json.JSONDecodeError as e:
        raise JsonPosError(re.sub(r"\s+(starting )?at$", "", e.msg.lower()), e.pos) from None


@dataclass
class Issue:
    """One problem found in a step: where it starts, its category, the quote span, hint variants."""

    pos: int
    category: str
    span: tuple[int, int]
    hint_vars: list[dict]


@dataclass
class CallBlock:
    """One `<tool_call>` block of a step. Positions are absolute in the step text.

    `error` is set (with `error_pos`) when the block is not a complete, valid
    `{"name": ..., "arguments": {...}}` object; `closed` is False when `</tool_call>` never came
    (e.g. generation stopped at max tokens).
    """

    index: int
    start: int  # position of "<tool_call>"
    end: int  # end of "</tool_call>" (or of the text when not closed)
    closed: bool
    root: Node | None = None
    name: str | None = None
    name_span: tuple[int, int] | None = None  # without the quotes
    args: Node | None = None
    error: str | None = None
    error_pos: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def extract_calls(text: str) -> list[CallBlock]:
    """All `<tool_call>` blocks in `text`, in order, parsed with positions (never raises)."""
    blocks: list[CallBlock] = []
    pos = 0
    while True:
        a = text.find(OPEN, pos)
        if a < 0:
            return blocks
        body = a + len(OPEN)
        b = text.find(CLOSE, body)
        nxt = text.find(OPEN, body)
        closed = b != -1 and (nxt == -1 or b < nxt)
        inner_end = b if closed else (len(text) if nxt == -1 else nxt)
        blk = CallBlock(len(blocks), a, b + len(CLOSE) if closed else inner_end, closed)
        _parse_block(text, body, inner_end, blk)
        blocks.append(blk)
        pos = blk.end


_LEADING_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]+)"')


def _parse_block(text: str, start: int, end: int, blk: CallBlock) -> None:
    inner = text[:end]  # parse within the block; positions stay absolute
    dups: list[tuple[int, int]] = []
    try:
        root = parse_value(inner, start, dups)
        j = _skip_ws(inner, root.end)
        if j != end:
            raise JsonPosError("extra text after the call object", j)
    except JsonPosError as e:
        blk.error, blk.error_pos = e.msg, min(e.pos, end)
        m = _LEADING_NAME.match(inner, start)  # a cut-off call still names its function first
        if m and m.end() <= blk.error_pos:
            blk.name, blk.name_span = m.group(1), (m.start(1), m.end(1))
        if not blk.closed and dups and dups[0][0] < blk.error_pos:
            # cut off inside a repetition loop: the error starts where a key first repeats
            blk.error, blk.error_pos = "a key is repeated (a generation loop)", dups[0][0]
        return
    blk.root = root
    if not root.is_object:
        blk.error, blk.error_pos = "the call is not a JSON object", root.start
        return
    name = root.fields.get("name")
    if name is None or not isinstance(name.value.value, str):
        blk.error, blk.error_pos = "the call has no string 'name'", (name.value.start if name else root.close_brace)
        return
    blk.name = name.value.value
    blk.name_span = (name.value.start + 1, name.value.end - 1)
    args = root.fields.get("arguments") or root.fields.get("parameters")
    # no arguments key: an empty object closed where the call was (its `}` is where they were left out)
    blk.args = args.value if args is not None else Node({}, root.close_brace, root.end)


_WORD_RE = re.compile(r"[A-Za-z0-9_]+")
_MAX_STRING_QUOTE = 40


def string_content_span(node: Node) -> tuple[int, int]:
    """The error tokens of a string value: its characters without the quotes (the quotes are right:
    a string was expected), or its closing quote when it is empty (closing it at once was the error).
    Any other value is quoted whole."""
    if not isinstance(node.value, str):
        return node.start, node.end
    if node.end - node.start == 2:
        return node.end - 1, node.end
    return node.start + 1, node.end - 1


def token_span(text: str, pos: int) -> tuple[int, int] | None:
    """[pos, end) of the JSON token (or call tag) that starts at `pos`; None at the end of the text.

    A string is the whole string literal (an unterminated one: to the end of its line, at most
    40 chars); a number or a bare word is the run of word characters; anything else one char.
    """
    if pos >= len(text):
        return None
    for tag in (CLOSE, OPEN):
        if text.startswith(tag, pos):
            return pos, pos + len(tag)
    c = text[pos]
    if c == '"':
        try:
            _, end = scanstring(text, pos + 1, True)
            return pos, end
        except json.JSONDecodeError:  # unterminated: to the end of its line (never empty: text[pos] is '"')
            line_end = text.find("\n", pos)
            return pos, min(len(text) if line_end == -1 else line_end, pos + _MAX_STRING_QUOTE)
    m = _NUMBER_RE.match(text, pos) or _WORD_RE.match(text, pos)  # never empty
    return (pos, m.end()) if m else (pos, pos + 1)


def json_error_span(text: str, pos: int, start: int) -> tuple[int, int] | None:
    """The error tokens of a call that is not valid JSON: the token at the decoder's error position.

    When the text ended first (the reply was cut off), it is the last generated character and
    the whitespace after it (`Rendered.quote_span` widens that to the last generated token).
    Nothing before `start` (the forced reply prefill) is ever returned: None when the model
    generated nothing there to quote.
    """
    span = token_span(text, pos)
    if span is None:  # cut off: from the last generated non-space char (or the prefill's end) to the end
        last = start + len(text[start:].rstrip(_WS))
        span = (max(last - 1, start), len(text))
    a, b = max(span[0], start), span[1]
    return (a, b) if b > a else None


def in_generated(span: tuple[int, int] | None, start: int) -> tuple[int, int] | None:
    """`span` cut to the generated text (from `start`, the end of the reply prefill); None if nothing is left."""
    if span is None or span[1] <= max(span[0], start):
        return None
    return max(span[0], start), span[1]


def render_value(v: Any) -> str:
    """A value the way it appears in a call (JSON), for hints."""
    return json.dumps(v, ensure_ascii=False)


def name_span(blk: CallBlock) -> tuple[int, int]:
    """The called name without its quotes; an empty name: its closing quote."""
    a, b = blk.name_span
    return (a, b) if b > a else (b, b + 1)
