"""Log formats: detect the shape of one parsed record and convert it to an opsd trajectory dict.

Each converter takes one parsed JSON value and returns a `Converted`: the trajectory as a plain
dict in the normalised OpenAI chat form, plus, for each message, the JSON path in the USER's
record that produced it. Errors raise `FormatError(path, expected)` with a path into the user's
own record (`$.conversations[3].value`), never into the converted form. The loader
(`opsd.io.trajectories`) adds the file and line.

| format     | one record is                                                          | module      |
|------------|------------------------------------------------------------------------|-------------|
| `openai`   | `{"id", "messages", "tools", "meta"}`                                  | (as is)     |
| `messages` | a bare JSON list of chat messages                                      | (as is)     |
| `sharegpt` | `{"conversations": [{"from", "value"}]}` (Hermes, LLaMA-Factory)       | `sharegpt`  |
| `xlam`     | `{"query", "tools": JSON string, "answers": JSON string}` (APIGen)     | `xlam`      |
| `otel`     | an OTLP export request `{"resourceSpans": [...]}` (GenAI spans)        | `otel`      |
"""
from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("openai", "messages", "sharegpt", "xlam", "otel")
# keys that mark a JSON object as one trajectory record (used to tell a JSON array of
# trajectories from a bare list of chat messages)
RECORD_KEYS = ("messages", "conversations", "query", "resourceSpans")
EXPECTED_SHAPES = ("an object with 'messages' (openai), a JSON list of chat messages, an object with "
                   "'conversations' (ShareGPT/Hermes), an object with 'query' and 'answers' (xLAM), or an "
                   "OTLP export request with 'resourceSpans' (OpenTelemetry GenAI spans)")


class FormatError(ValueError):
    """A record that does not fit its format. `path` is a JSON path into the user's record."""

    def __init__(self, path: str, expected: str):
        self.path, self.expected = path, expected
        super().__init__(f"{path}: {expected}")


@dataclass
class Converted:
    """A trajectory dict plus, per message, the JSON path of the user's field it came from."""

    traj: dict
    origins: list[str] = field(default_factory=list)  # origins[i] = source path of messages[i] ("" = unknown)
    tools_origin: str = "$.tools"  # where the tools came from (a system prompt's <tools> block, say)


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
        return f"an object with keys [{keys}]" if obj else "an empty object"
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), f"a {type(obj).__name__}")


def detect_format(obj) -> str:
    """The format name of one parsed record; ValueError (naming every accepted shape) if none fits."""
    if isinstance(obj, list):
        return "messages"
    if isinstance(obj, dict):
        if "conversations" in obj:
            return "sharegpt"
        if "messages" in obj:
            return "openai"
        if "resourceSpans" in obj or "instrumentationLibrarySpans" in obj:
            return "otel"
        if "query" in obj and "answers" in obj:
            return "xlam"
        if "resourceMetrics" in obj or "resourceLogs" in obj:
            raise ValueError("OTLP traces ('resourceSpans'); this is OTLP metrics or logs, which hold no "
                             "model calls: point the collector's file exporter of the traces pipeline here")
    raise ValueError(f"a trajectory record: {EXPECTED_SHAPES}; got {_describe(obj)}")


def is_record_list(obj) -> bool:
    """True for a JSON list whose items are trajectory records (not the chat messages of one)."""
    return isinstance(obj, list) and any(
        isinstance(x, list) or (isinstance(x, dict) and "role" not in x and any(k in x for k in RECORD_KEYS))
        for x in obj)
