"""OpenTelemetry GenAI spans (OTLP JSON, as the Collector's file exporter writes them) -> trajectories.

Each line of the file is one OTLP export request:

    {"resourceSpans": [{"resource": {...}, "scopeSpans": [{"scope": {...}, "spans": [
        {"traceId": "5b8e...", "spanId": "051f...", "parentSpanId": "a1b2...", "name": "chat gpt-4o",
         "startTimeUnixNano": "1718000000000000000", "endTimeUnixNano": "...",
         "attributes": [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
                        {"key": "gen_ai.input.messages", "value": {"stringValue": "[{\"role\": \"user\", ...}]"}},
                        ...]}]}]}]}

Spans are grouped into one trajectory per trace (spans of a trace may sit on any line, in any order)
and ordered by parent, then start time. The model-call spans (`gen_ai.operation.name` `chat`,
`text_completion` or `generate_content`) give the conversation: each call's `gen_ai.input.messages`
(the history, `parts` of type `text`, `tool_call`, `tool_call_response`) continues the one before, and
its `gen_ai.output.messages` (first choice) is the reply. `gen_ai.system_instructions` becomes the
system message and `gen_ai.tool.definitions` the tools. `execute_tool` spans (`gen_ai.tool.call.id`,
`gen_ai.tool.name`, `gen_ai.tool.call.result`) fill in tool results that no later model call shows.
A call whose history does not continue any conversation so far starts another one (sub-agents):
the trajectory ids are the trace id, then `<trace id>#2`, `#3`, ...

Structured attribute values (`arrayValue`/`kvlistValue`) and JSON strings are both accepted.
Errors carry the file, line and JSON path of the span (and attribute) they are about.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from opsd.io.formats import FormatError

MODEL_OPS = ("chat", "text_completion", "generate_content")
TOOL_OP = "execute_tool"
AGENT_OP = "invoke_agent"
_ROLES = ("system", "user", "assistant", "tool")
Where = tuple[str, int, str]  # (file, line, JSON path)


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start: int
    attrs: dict
    attr_paths: dict  # attribute key -> JSON path of its value
    status: dict
    where: Where = ("", 0, "$")

    @property
    def op(self) -> str | None:
        op = self.attrs.get("gen_ai.operation.name")
        return op if isinstance(op, str) else None

    def at(self, key: str, suffix: str = "") -> Where:
        file, line, path = self.where
        return file, line, f"{self.attr_paths.get(key, path)} ({key}){suffix}"


class SpanError(FormatError):
    """A FormatError that knows its file and line (the span it is about may sit on another line)."""

    def __init__(self, where: Where, expected: str):
        super().__init__(where[2], expected)
        self.file, self.line = where[0], where[1]


# -- one export request -> spans ------------------------------------------------------------

def any_value(v, path: str, *, strict: bool = True):
    """An OTLP JSON AnyValue ({"stringValue": ...}, {"arrayValue": {"values": [...]}}, ...) as Python."""
    if isinstance(v, dict):
        if not v:
            return None
        for key, conv in (("stringValue", str), ("boolValue", bool), ("intValue", int), ("doubleValue", float),
                          ("bytesValue", str)):
            if key in v:
                try:
                    return conv(v[key])
                except (TypeError, ValueError):
                    break
        else:
            if isinstance(v.get("arrayValue"), dict):
                return [any_value(x, f"{path}.arrayValue.values[{i}]", strict=strict)
                        for i, x in enumerate(v["arrayValue"].get("values") or [])]
            if isinstance(v.get("kvlistValue"), dict):
                return {kv.get("key"): any_value(kv.get("value"), f"{path}.kvlistValue.values[{i}].value", strict=strict)
                        for i, kv in enumerate(v["kvlistValue"].get("values") or []) if isinstance(kv, dict)}
    if strict:
        raise FormatError(path, "an OTLP AnyValue such as {\"stringValue\": ...}, {\"intValue\": \"3\"}, "
                                f"{{\"arrayValue\": {{\"values\": [...]}}}} or {{\"kvlistValue\": ...}}; got {json.dumps(v)[:80]}")
    return None


def _span(sp, path: str) -> Span:
    if not isinstance(sp, dict):
        raise FormatError(path, f"a span object, got {type(sp).__name__}")
    for key in ("traceId", "spanId"):
        if not isinstance(sp.get(key), str) or not sp[key]:
            raise FormatError(f"{path}.{key}", f"the span's {key} as a non-empty hex string")
    parent = sp.get("parentSpanId") or ""
    if not isinstance(parent, str):
        raise FormatError(f"{path}.parentSpanId", "a hex string (or empty for a root span)")
    try:
        start = int(sp.get("startTimeUnixNano"))
    except (TypeError, ValueError):
        raise FormatError(f"{path}.startTimeUnixNano", "the start time in nanoseconds since the epoch "
                                                       "(a decimal string such as \"1718000000000000000\")") from None
    attrs_raw = sp.get("attributes") or []
    if not isinstance(attrs_raw, list):
        raise FormatError(f"{path}.attributes", "a list of {\"key\", \"value\"} attributes")
    attrs, attr_paths = {}, {}
    for j, a in enumerate(attrs_raw):
        apath = f"{path}.attributes[{j}]"
        if not isinstance(a, dict) or not isinstance(a.get("key"), str):
            raise FormatError(apath, "an attribute {\"key\": string, \"value\": AnyValue}")
        attrs[a["key"]] = any_value(a.get("value"), f"{apath}.value", strict=a["key"].startswith("gen_ai."))
        attr_paths[a["key"]] = f"{apath}.value"
    status = sp.get("status") if isinstance(sp.get("status"), dict) else {}
    return Span(sp["traceId"], sp["spanId"], parent, str(sp.get("name") or ""), start, attrs, attr_paths, status,
                ("", 0, path))


def parse_request(obj: dict, prefix: str = "$") -> tuple[list[Span], list[FormatError]]:
    """The spans in one export request, and one error per part that is not well-formed (the rest is kept).

    `prefix` is the JSON path of the request in its line or document (`$[2]` for an array element)."""
    spans: list[Span] = []
    errors: list[FormatError] = []
    resources = obj.get("resourceSpans", obj.get("instrumentationLibrarySpans"))
    if not isinstance(resources, list):
        return [], [FormatError(f"{prefix}.resourceSpans", "a list of ResourceSpans objects")]
    for i, res in enumerate(resources):
        rpath = f"{prefix}.resourceSpans[{i}]"
        if not isinstance(res, dict):
            errors.append(FormatError(rpath, "a ResourceSpans object with 'scopeSpans'"))
            continue
        key = "scopeSpans" if "scopeSpans" in res else "instrumentationLibrarySpans"
        scopes = res.get(key) or []
        if not isinstance(scopes, list):
            errors.append(FormatError(f"{rpath}.{key}", "a list of ScopeSpans objects"))
            continue
        for j, scope in enumerate(scopes):
            spath = f"{rpath}.{key}[{j}]"
            items = scope.get("spans") if isinstance(scope, dict) else None
            if not isinstance(items, list):
                errors.append(FormatError(f"{spath}.spans", "a list of spans"))
                continue
            for k, sp in enumerate(items):
                try:
                    spans.append(_span(sp, f"{spath}.spans[{k}]"))
                except FormatError as e:
                    errors.append(e)
    return spans, errors


# -- spans of one trace -> conversations ------------------------------------------------------

def _json_attr(span: Span, key: str):
    """A structured attribute (given structured, or as a JSON string); None if absent."""
    value = span.attrs.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise SpanError(span.at(key), f"JSON ({e.msg} at column {e.colno})") from None
    return value


def _text(part: dict):
    content = part.get("content")
    return content if isinstance(content, str) else None


def _convert_messages(span: Span, key: str, skipped: Counter) -> list[tuple[dict, Where]]:
    """gen_ai.input/output.messages -> [(OpenAI message, where)]; tool ids may be None (filled later)."""
    value = _json_attr(span, key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpanError(span.at(key), "a list of messages {\"role\", \"parts\": [...]}")
    out = []
    for i, m in enumerate(value):
        where = span.at(key, f"[{i}]")
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("parts", []), list):
            raise SpanError(where, f"a message {{\"role\": one of {', '.join(_ROLES)}, \"parts\": [...]}}")
        texts, calls, results = [], [], []
        for k, part in enumerate(m.get("parts") or []):
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype == "text" and _text(part) is not None:
                texts.append(part["content"])
            elif ptype == "tool_call":
                if not isinstance(part.get("name"), str) or not part["name"]:
                    raise SpanError(span.at(key, f"[{i}].parts[{k}].name"), "the called tool's name (a non-empty string)")
                args = part.get("arguments")
                args_s = args if isinstance(args, str) else json.dumps({} if args is None else args, ensure_ascii=False)
                cid = part.get("id").strip() if isinstance(part.get("id"), str) and part["id"].strip() else None
                calls.append({"id": cid, "type": "function", "function": {"name": part["name"], "arguments": args_s}})
            elif ptype == "tool_call_response":
                resp = part.get("response", part.get("result"))
                rid = part.get("id").strip() if isinstance(part.get("id"), str) and part["id"].strip() else None
                results.append({"role": "tool", "tool_call_id": rid,
                                "content": resp if isinstance(resp, str) else json.dumps(resp, ensure_ascii=False)})
            else:
                skipped[str(ptype)] += 1  # reasoning, blob, file, uri, ...: not part of the text the model saw
        text = "\n".join(texts)
        if m["role"] == "assistant":
            msg = {"role": "assistant", "content": text if text or not calls else None}
            if calls:
                msg["tool_calls"] = calls
            out.append((msg, where))
        elif m["role"] == "tool":
            if not results and texts:  # a tool message given as text: answers the next unanswered call
                results.append({"role": "tool", "tool_call_id": None, "content": text})
            elif texts:
                skipped["text beside tool_call_response"] += len(texts)
        elif texts or not results:
            out.append(({"role": m["role"], "content": text}, where))
        out += [(r, where) for r in results]
    return out


def _key(msg: dict) -> str:
    return json.dumps(msg, sort_keys=True, ensure_ascii=False)


@dataclass
class _Conversation:
    messages: list[dict] = field(default_factory=list)
    wheres: list[Where] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    spans: list[str] = field(default_factory=list)

    def add(self, pairs: list[tuple[dict, Where]]) -> None:
        for msg, where in pairs:
            self.messages.append(msg)
            self.wheres.append(where)
            self.keys.append(_key(msg))


def order_spans(spans: list[Span]) -> list[Span]:
    """Parents before children, siblings by start time (then span id); cycles cannot loop."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[Span]] = {}
    for s in spans:
        children.setdefault(s.parent_id if s.parent_id in ids and s.parent_id != s.span_id else "", []).append(s)
    ordered, seen = [], set()
    stack = sorted(children.get("", []), key=lambda s: (s.start, s.span_id), reverse=True)
    while stack:
        s = stack.pop()
        if s.span_id in seen:
            continue
        seen.add(s.span_id)
        ordered.append(s)
        stack += sorted(children.get(s.span_id, []), key=lambda c: (c.start, c.span_id), reverse=True)
    ordered += sorted((s for s in spans if s.span_id not in seen), key=lambda s: (s.start, s.span_id))
    return ordered


def _tools(model_spans: list[Span]) -> list[dict]:
    tools, names = [], set()
    for s in model_spans:
        defs = _json_attr(s, "gen_ai.tool.definitions") or []
        if not isinstance(defs, list):
            raise SpanError(s.at("gen_ai.tool.definitions"), "a list of tool definitions {\"type\": \"function\", \"name\", ...}")
        for i, d in enumerate(defs):
            fn = d.get("function", d) if isinstance(d, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise SpanError(s.at("gen_ai.tool.definitions", f"[{i}]"), "a tool definition with a non-empty 'name'")
            if fn["name"] not in names and d.get("type", "function") == "function":
                names.add(fn["name"])
                tools.append({"type": "function", "function": {k: v for k, v in fn.items()
                                                                if k in ("name", "description", "parameters") and v is not None}})
    return tools


def _fill_tool_results(conv: _Conversation, tool_spans: list[Span]) -> None:
    """Insert execute_tool results for calls that no later message answers."""
    answered = {m.get("tool_call_id") for m in conv.messages if m["role"] == "tool"}
    used: set[str] = set()
    i = 0
    while i < len(conv.messages):
        m = conv.messages[i]
        insert_at = i + 1
        while insert_at < len(conv.messages) and conv.messages[insert_at]["role"] == "tool":
            insert_at += 1
        new = []
        idless_answers = sum(1 for t in conv.messages[i + 1:insert_at] if t["tool_call_id"] is None)
        for call in m.get("tool_calls") or []:
            if call["id"] is not None and call["id"] in answered:
                continue
            if call["id"] is None and idless_answers:
                idless_answers -= 1
                continue
            match = next((s for s in tool_spans if s.span_id not in used and (
                str(s.attrs.get("gen_ai.tool.call.id") or "").strip() == call["id"] if call["id"] is not None
                else s.attrs.get("gen_ai.tool.name") == call["function"]["name"])), None)
            if match is None:
                continue
            result = match.attrs.get("gen_ai.tool.call.result")
            if result is None and match.status.get("code") in (2, "STATUS_CODE_ERROR"):
                result = f"error: {match.status.get('message') or match.attrs.get('error.type') or 'tool failed'}"
            if result is None:
                continue
            used.add(match.span_id)
            content = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
            new.append(({"role": "tool", "tool_call_id": call["id"], "content": content},
                        match.at("gen_ai.tool.call.result")))
        for k, (msg, where) in enumerate(new):
            conv.messages.insert(insert_at + k, msg)
            conv.wheres.insert(insert_at + k, where)
        i += 1


def _assign_ids(conv: _Conversation) -> None:
    taken = {c["id"] for m in conv.messages for c in m.get("tool_calls") or [] if c["id"]}
    pending: list[str] = []
    n = 0
    for m, where in zip(conv.messages, conv.wheres):
        for c in m.get("tool_calls") or []:
            if c["id"] is None:
                while f"call_{n}" in taken:
                    n += 1
                c["id"] = f"call_{n}"
                taken.add(c["id"])
            pending.append(c["id"])
        if m["role"] == "tool":
            if m["tool_call_id"] is None:
                if not pending:
                    raise SpanError(where, "a tool_call_response with the 'id' of the call it answers "
                                           "(no unanswered tool call comes before it)")
                m["tool_call_id"] = pending[0]
            if m["tool_call_id"] in pending:
                pending.remove(m["tool_call_id"])


def assemble_trace(spans: list[Span]) -> list[tuple[dict, list[Where]]]:
    """One trace's spans -> [(trajectory dict, where of each message)]; raises SpanError.

    A span seen twice (an exporter that retried) counts once: the first copy is kept."""
    unique: dict[str, Span] = {}
    for s in spans:
        unique.setdefault(s.span_id, s)
    ordered = order_spans(list(unique.values()))
    trace_id = ordered[0].trace_id
    model = [s for s in ordered if s.op in MODEL_OPS]
    with_content = [s for s in model if "gen_ai.input.messages" in s.attrs or "gen_ai.output.messages" in s.attrs]
    if not with_content:
        ops = Counter(s.op or "no gen_ai.operation.name" for s in ordered)
        seen = ", ".join(f"{n} {op}" for op, n in ops.items())
        hint = (f"; its {len(model)} model span(s) carry no gen_ai.input.messages/gen_ai.output.messages: turn on "
                "message content capture in the instrumentation") if model else ""
        raise SpanError(ordered[0].where, f"trace {trace_id}: a model call (a span with gen_ai.operation.name "
                                          f"{'/'.join(MODEL_OPS)} and its messages); the trace has {seen}{hint}")
    skipped: Counter = Counter()
    conversations: list[_Conversation] = []
    for s in with_content:
        inp = _convert_messages(s, "gen_ai.input.messages", skipped)
        system = _json_attr(s, "gen_ai.system_instructions")
        if isinstance(system, list):
            text = "\n".join(p["content"] for p in system if isinstance(p, dict) and isinstance(p.get("content"), str))
            if text and not (inp and inp[0][0] == {"role": "system", "content": text}):
                inp.insert(0, ({"role": "system", "content": text}, s.at("gen_ai.system_instructions")))
        out = _convert_messages(s, "gen_ai.output.messages", skipped)
        if len(out) > 1 and all(m["role"] == "assistant" for m, _ in out):
            out = out[:1]  # several choices: the first is the reply the agent went on with
        keys = [_key(m) for m, _ in inp]
        conv = max((c for c in conversations if c.keys == keys[:len(c.keys)]), key=lambda c: len(c.keys), default=None)
        if conv is None and not inp and conversations:
            conv = conversations[-1]
        if conv is None:
            conv = _Conversation()
            conversations.append(conv)
        conv.add(inp[len(conv.keys):])
        conv.add(out)
        conv.spans.append(s.span_id)
    tools = _tools(with_content)
    tool_spans = [s for s in ordered if s.op == TOOL_OP]
    agent = next((s.attrs.get("gen_ai.agent.name") for s in ordered if s.op == AGENT_OP and s.attrs.get("gen_ai.agent.name")), None)
    first = with_content[0].attrs
    out = []
    for k, conv in enumerate(conversations):
        _fill_tool_results(conv, tool_spans)
        _assign_ids(conv)
        meta = {"source": "otel", "trace_id": trace_id, "model_spans": conv.spans,
                "model": first.get("gen_ai.response.model") or first.get("gen_ai.request.model")}
        if agent:
            meta["agent"] = agent
        if first.get("gen_ai.conversation.id"):
            meta["conversation_id"] = first["gen_ai.conversation.id"]
        if skipped:
            meta["skipped_parts"] = dict(skipped)
        if len(spans) > len(unique):
            meta["duplicate_spans"] = len(spans) - len(unique)
        tid = trace_id if k == 0 else f"{trace_id}#{k + 1}"
        out.append(({"id": tid, "messages": conv.messages, "tools": tools, "meta": meta}, conv.wheres))
    return out
