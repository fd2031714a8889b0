"""Load, validate and normalise trajectory logs (JSONL, one trajectory per line).

Accepted line shapes, all normalised into `opsd.types.Trajectory`:
- `openai`:   {"id", "messages", "tools", "meta"} in OpenAI chat format;
- `messages`: a bare JSON list of OpenAI chat messages;
- `sharegpt`: {"conversations": [{"from", "value"}...]} (ShareGPT/Hermes), with tool calls
  written as `<tool_call>{...}</tool_call>` text and tools under "tools" or in the system
  prompt's `<tools>...</tools>`.

Every line is checked with jsonschema against `opsd/schemas/*.schema.json`. A bad line raises
`TrajectoryError` naming FILE:LINE, the JSON path and what was expected, or, when a `rejects`
writer is given, is written there with its reason and counted (nothing is dropped silently).

    opsd validate data/*.jsonl --rejects rejects.jsonl
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

import jsonschema

from opsd.types import Trajectory, content_hash

FORMATS = ("openai", "messages", "sharegpt")
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_TOOLS_RE = re.compile(r"<tools>\s*(.*?)\s*</tools>", re.S)
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "function_call": "assistant", "tool": "tool",
                   "observation": "tool", "function_response": "tool"}


class TrajectoryError(ValueError):
    """A line that is not a valid trajectory. str() is `FILE:LINE: <json path>: <expected>`."""

    def __init__(self, file: str, line: int, path: str, expected: str):
        self.file, self.line, self.path, self.expected = file, line, path, expected
        super().__init__(f"{file}:{line}: {path}: {expected}")


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """A JSON schema shipped in `opsd/schemas/` (e.g. "trajectory")."""
    text = resources.files("opsd.io").joinpath("schemas", f"{name}.schema.json").read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _check(name: str, obj, prefix: str = "$") -> tuple[str, str] | None:
    """(json path, message) of the most relevant schema violation, or None if valid."""
    err = jsonschema.exceptions.best_match(_validator(name).iter_errors(obj))
    if err is None:
        return None
    path = prefix + err.json_path[1:]
    if err.validator == "anyOf" and path.endswith("]"):
        return path, "assistant message needs a string 'content' or a non-empty 'tool_calls' list"
    return path, err.message


def detect_format(obj) -> str:
    if isinstance(obj, list):
        return "messages"
    if isinstance(obj, dict) and "conversations" in obj:
        return "sharegpt"
    if isinstance(obj, dict) and "messages" in obj:
        return "openai"
    raise ValueError("expected a JSON object with 'messages' or 'conversations', or a JSON list of messages")


def _semantic_problem(traj: dict) -> tuple[str, str] | None:
    """Checks jsonschema cannot express: tool messages answer a call made earlier."""
    seen_ids: set[str] = set()
    for i, m in enumerate(traj["messages"]):
        for call in m.get("tool_calls") or []:
            if "id" in call:
                seen_ids.add(call["id"])
        if m["role"] == "tool" and seen_ids and m["tool_call_id"] not in seen_ids:
            return (f"$.messages[{i}].tool_call_id",
                    f"{m['tool_call_id']!r} does not match the id of any earlier assistant tool call")
    return None


def parse_tool_call_text(text: str) -> tuple[str, list[dict], list[str]]:
    """Split Hermes-style text into (remaining content, tool_calls, parse errors).

    Blocks that are not valid `{"name", "arguments"}` JSON stay in the content verbatim and are
    reported in the errors list, so nothing is lost.
    """
    calls, errors, kept = [], [], []
    last = 0
    for k, m in enumerate(_TOOL_CALL_RE.finditer(text)):
        kept.append(text[last:m.start()])
        last = m.end()
        try:
            obj = json.loads(m.group(1))
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                raise ValueError("expected an object with a string 'name'")
            args = obj.get("arguments", obj.get("parameters", {}))
            args_s = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            calls.append({"id": f"call_{k}", "type": "function", "function": {"name": obj["name"], "arguments": args_s}})
        except (ValueError, json.JSONDecodeError) as e:
            errors.append(f"tool call {k}: {e}")
            kept.append(m.group(0))
    kept.append(text[last:])
    return "".join(kept).strip(), calls, errors


def _sharegpt_to_openai(obj: dict) -> dict:
    messages: list[dict] = []
    pending: list[str] = []  # ids of calls not yet answered, in order
    n_calls = 0
    tools = obj.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else []
    meta = {k: v for k, v in obj.items() if k not in ("id", "conversations", "tools")}
    for turn in obj["conversations"]:
        role, value = _SHAREGPT_ROLES[turn["from"]], turn["value"]
        if role == "system" and tools is None:
            blocks = [b for b in _TOOLS_RE.findall(value) if b.strip()]  # skip prose like "<tools></tools> tags"
            if blocks:
                raw = blocks[-1]
                try:
                    parsed = json.loads(raw if raw.lstrip().startswith("[") else "[" + ",".join(raw.split("\n")) + "]")
                    tools = parsed
                except json.JSONDecodeError as e:
                    raise ValueError(f"<tools> block in the system prompt is not JSON: {e}") from e
        if role == "assistant":
            content, calls, errors = parse_tool_call_text(value)
            for c in calls:
                c["id"] = f"call_{n_calls}"
                n_calls += 1
                pending.append(c["id"])
            msg = {"role": "assistant", "content": content}
            if calls:
                msg["tool_calls"] = calls
            if errors:
                meta.setdefault("parse_errors", []).append({"message": len(messages), "errors": errors})
            messages.append(msg)
        elif role == "tool":
            inner = re.sub(r"^\s*<tool_response>\s*|\s*</tool_response>\s*$", "", value)
            messages.append({"role": "tool", "tool_call_id": pending.pop(0) if pending else "call_unknown",
                             "content": inner})
        else:
            messages.append({"role": role, "content": value})
    tools = [t if "function" in t else {"type": "function", "function": t} for t in (tools or [])]
    return {"id": obj.get("id"), "messages": messages, "tools": tools, "meta": meta}


def normalise(obj, *, file: str = "<input>", line: int = 0) -> tuple[Trajectory, str]:
    """Validate one parsed JSONL line and return (Trajectory, format). Raises TrajectoryError."""
    try:
        fmt = detect_format(obj)
    except ValueError as e:
        raise TrajectoryError(file, line, "$", str(e)) from None
    if fmt == "sharegpt":
        problem = _check("sharegpt", obj)
        if problem:
            raise TrajectoryError(file, line, *problem)
        try:
            traj = _sharegpt_to_openai(obj)
        except (ValueError, AttributeError, TypeError) as e:
            raise TrajectoryError(file, line, "$.conversations", str(e)) from None
    elif fmt == "messages":
        traj = {"id": None, "messages": obj, "tools": [], "meta": {}}
    else:
        traj = dict(obj)
    if traj.get("id") is None:
        traj["id"] = "traj-" + content_hash({"messages": traj["messages"], "tools": traj.get("tools") or []})[:12]
    problem = _check("trajectory", traj) or _semantic_problem(traj)
    if problem:
        path, msg = problem
        if fmt == "messages":
            path = path.replace("$.messages", "$", 1)
        raise TrajectoryError(file, line, path, msg)
    traj["id"] = str(traj["id"])
    return Trajectory.from_dict(traj), fmt


@dataclass
class LoadSummary:
    """Counts from reading trajectory files: valid lines per format, rejected lines."""

    per_format: Counter = field(default_factory=Counter)
    rejected: int = 0
    files: int = 0

    @property
    def valid(self) -> int:
        return sum(self.per_format.values())


def iter_trajectories(paths: str | Path | Iterable[str | Path], *, rejects=None,
                      summary: LoadSummary | None = None) -> Iterator[Trajectory]:
    """Yield trajectories from JSONL files, in file then line order.

    Without `rejects`, the first bad line raises TrajectoryError. With `rejects` (an open text
    file), bad lines are written there as {"file", "line", "error", "raw"} and counted in
    `summary.rejected`. Blank lines are skipped; duplicate ids across lines are an error.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    summary = summary if summary is not None else LoadSummary()
    seen: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        summary.files += 1
        with p.open("r", encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError as e:
                        raise TrajectoryError(str(p), lineno, "$", f"valid JSON ({e.msg} at column {e.colno})") from None
                    traj, fmt = normalise(obj, file=str(p), line=lineno)
                    if traj.id in seen:
                        raise TrajectoryError(str(p), lineno, "$.id",
                                              f"a unique id; {traj.id!r} already used at {seen[traj.id]}")
                    seen[traj.id] = f"{p}:{lineno}"
                except TrajectoryError as e:
                    if rejects is None:
                        raise
                    summary.rejected += 1
                    rejects.write(json.dumps({"file": e.file, "line": e.line, "path": e.path,
                                              "error": e.expected, "raw": raw.rstrip("\n")}, ensure_ascii=False) + "\n")
                    rejects.flush()
                    continue
                summary.per_format[fmt] += 1
                yield traj


def load_trajectories(paths, **kw) -> list[Trajectory]:
    return list(iter_trajectories(paths, **kw))


def write_trajectories(path: str | Path, trajectories: Iterable[Trajectory]) -> int:
    """Write trajectories as normalised JSONL; returns the count."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for t in trajectories:
            f.write(json.dumps(t.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n
