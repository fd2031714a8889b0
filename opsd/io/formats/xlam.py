"""xLAM / APIGen function-calling records (Salesforce/xlam-function-calling-60k) -> opsd trajectory.

    {"id": 0, "query": "Where can I find live giveaways for beta access?",
     "tools": "[{\"name\": \"live_giveaways_by_type\", \"description\": \"...\",
                 \"parameters\": {\"type\": {\"description\": \"...\", \"type\": \"str\", \"default\": \"game\"}}}]",
     "answers": "[{\"name\": \"live_giveaways_by_type\", \"arguments\": {\"type\": \"beta\"}}]"}

`tools` and `answers` are JSON strings in the released data (lists are accepted too). The query becomes
the user message and the answers ONE assistant message with parallel tool calls (`call_0`, ...).
Tool parameters are xLAM's flat `{name: {"type": "str, optional", "description", "default"}}` map;
they become a JSON-schema object (`str` -> string, `List[int]` -> array, ...), a parameter being
required unless its type says `optional` or it has a default. A `parameters` that already is a JSON
schema (`{"type": "object", "properties": ...}`) is kept as is.
"""
from __future__ import annotations

import json
import re

from opsd.io.formats import Converted, FormatError

_BASE_TYPES = {"str": "string", "string": "string", "int": "integer", "integer": "integer", "float": "number",
               "number": "number", "bool": "boolean", "boolean": "boolean", "list": "array", "tuple": "array",
               "set": "array", "array": "array", "dict": "object", "object": "object", "none": "null"}


def json_schema_type(xlam_type: str) -> dict:
    """`"List[int], optional"` -> `{"type": "array", "items": {"type": "integer"}}`; unknown -> `{}`."""
    t = re.sub(r",?\s*optional\s*$", "", xlam_type.strip(), flags=re.I).strip()
    m = re.fullmatch(r"(?i)(optional|union)\[(.*)\]", t)
    if m and m.group(1).lower() == "optional":
        return json_schema_type(m.group(2))
    m = re.fullmatch(r"(?i)(list|tuple|set|sequence)\[(.*)\]", t)
    if m:
        items = json_schema_type(m.group(2).split(",")[0])
        return {"type": "array", **({"items": items} if items else {})}
    if re.fullmatch(r"(?i)(dict|mapping)\[.*\]", t):
        return {"type": "object"}
    base = _BASE_TYPES.get(t.lower())
    return {"type": base} if base else {}


def _parameters(params, path: str) -> dict:
    if params is None or params == {}:
        return {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise FormatError(path, f"an object mapping parameter names to {{type, description}}, got {type(params).__name__}")
    if params.get("type") == "object" and isinstance(params.get("properties"), dict):
        return params  # already JSON schema
    props, required = {}, []
    for name, spec in params.items():
        if not isinstance(spec, dict):
            raise FormatError(f"{path}.{name}", f"a parameter spec object ({{type, description}}), got {type(spec).__name__}")
        xtype = spec.get("type", "")
        prop = json_schema_type(xtype) if isinstance(xtype, str) else {}
        prop.update({k: v for k, v in spec.items() if k in ("description", "default", "enum")})
        props[name] = prop
        optional = isinstance(xtype, str) and "optional" in xtype.lower()
        if not optional and "default" not in spec:
            required.append(name)
    return {"type": "object", "properties": props, "required": required}


def _json_list(obj: dict, key: str) -> list:
    value = obj.get(key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise FormatError(f"$.{key}", f"a JSON list (the '{key}' string is not JSON: {e.msg} at column {e.colno})") from None
    if not isinstance(value, list):
        raise FormatError(f"$.{key}", f"a list (or a JSON string of one), got {type(value).__name__}")
    return value


def convert(obj: dict) -> Converted:
    if not isinstance(obj.get("query"), str):
        raise FormatError("$.query", f"the user's request as a string, got {type(obj.get('query')).__name__}")
    tools = []
    for i, t in enumerate(_json_list(obj, "tools") if obj.get("tools") is not None else []):
        path = f"$.tools[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise FormatError(path, "a tool object with a non-empty string 'name'")
        fn = {"name": t["name"], "parameters": _parameters(t.get("parameters"), f"{path}.parameters")}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        tools.append({"type": "function", "function": fn})
    calls = []
    for k, a in enumerate(_json_list(obj, "answers")):
        path = f"$.answers[{k}]"
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not a["name"]:
            raise FormatError(path, "a call object with a non-empty string 'name' and 'arguments'")
        args = a.get("arguments", {})
        calls.append({"id": f"call_{k}", "type": "function", "function": {
            "name": a["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    if not calls:
        raise FormatError("$.answers", "at least one call (xLAM answers are the model's tool calls)")
    messages = [{"role": "user", "content": obj["query"]},
                {"role": "assistant", "content": None, "tool_calls": calls}]
    meta = {k: v for k, v in obj.items() if k not in ("id", "query", "tools", "answers")}
    meta["source"] = meta.get("source", "xlam")
    return Converted({"id": obj.get("id"), "messages": messages, "tools": tools, "meta": meta},
                     ["$.query", "$.answers"])
