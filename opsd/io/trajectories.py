"""Load, validate and normalise trajectory logs into `opsd.types.Trajectory`.

Accepted inputs (`iter_trajectories(paths)`; each path may be any of these, formats detected per record):
- JSON lines or a JSON document (a pretty-printed object, or a JSON array of records), plain or
  compressed (`.gz`, `.zst`, `.bz2`, `.xz`), in any of the formats of `opsd.io.formats`:
  `openai` {"id", "messages", "tools", "meta"}, `messages` (a bare list of chat messages),
  `sharegpt` (ShareGPT/Hermes/LLaMA-Factory), `xlam` (APIGen), `otel` (OpenTelemetry GenAI spans,
  grouped into one trajectory per trace across lines and files);
- Parquet/Arrow files, `datasets` save_to_disk folders, folders of data files, and hub dataset
  ids already in the local cache (`opsd.io.tables`).

Every record is checked against `opsd/io/schemas/trajectory.schema.json`. A bad record raises
`TrajectoryError` naming FILE:LINE, the JSON path in the user's own record and what was expected,
or, when a `rejects` writer is given, is written there with its reason and counted; the other
records go on (nothing valid is dropped). A record with no id gets one made from its file and line
(`logs.jsonl:7`), so identical lines are all kept; two records whose OWN ids collide are an error
naming both places.

    opsd validate data/*.jsonl logs.json.gz traces.otlp.jsonl --rejects rejects.jsonl
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

import jsonschema

from opsd.io.formats import (
    FORMATS,
    Converted,
    FormatError,
    detect_format,
    otel,
    sharegpt,
    xlam,
)
from opsd.io.formats.sharegpt import parse_tool_call_text
from opsd.io.sources import RawRecord
from opsd.io.tables import InputError, iter_path_records
from opsd.types import Trajectory, content_hash

__all__ = ["FORMATS", "LoadSummary", "TrajectoryError", "detect_format", "iter_trajectories", "load_schema",
           "load_trajectories", "normalise", "parse_tool_call_text", "write_trajectories"]


class TrajectoryError(ValueError):
    """A record that is not a valid trajectory. str() is `FILE:LINE: <json path>: <expected>`
    (`FILE: row N: ...` for table rows, `FILE: <expected>` for a whole input)."""

    def __init__(self, file: str, line: int, path: str, expected: str, *, unit: str = "line"):
        self.file, self.line, self.path, self.expected, self.unit = file, line, path, expected, unit
        where = file if not line else f"{file}:{line}" if unit == "line" else f"{file}: {unit} {line}"
        super().__init__(f"{where}: {path}: {expected}" if path else f"{where}: {expected}")


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """A JSON schema shipped in `opsd/io/schemas/` (e.g. "trajectory")."""
    text = resources.files("opsd.io").joinpath("schemas", f"{name}.schema.json").read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _is_str(x) -> bool:
    return type(x) is str


def _fast_call(c) -> bool:
    fn = c.get("function") if type(c) is dict else None
    return (type(fn) is dict and _is_str(fn.get("name")) and fn["name"] != "" and _is_str(fn.get("arguments"))
            and ("id" not in c or _is_str(c["id"])) and c.get("type", "function") == "function")


def _fast_message(m) -> bool:
    if type(m) is not dict or m.get("role") not in _ROLES or ("name" in m and not _is_str(m["name"])):
        return False
    content = m.get("content")
    if m["role"] == "assistant":
        calls, ids = m.get("tool_calls"), m.get("token_ids")
        return ((calls is None and "tool_calls" not in m) or (type(calls) is list and all(map(_fast_call, calls)))) \
            and ("token_ids" not in m or (type(ids) is list and all(type(t) is int and t >= 0 for t in ids))) \
            and ("prefill" not in m or _is_str(m["prefill"])) and (content is None or _is_str(content)) \
            and (_is_str(content) or bool(calls))
    if m["role"] == "tool":
        return _is_str(m.get("tool_call_id")) and _is_str(content)
    return _is_str(content)


def _fast_tool(t) -> bool:
    fn = t.get("function") if type(t) is dict else None
    return (type(fn) is dict and t.get("type") == "function" and _is_str(fn.get("name")) and fn["name"] != ""
            and ("description" not in fn or _is_str(fn["description"]))
            and ("parameters" not in fn or type(fn["parameters"]) is dict))


def fast_valid(traj) -> bool:
    """True only for trajectories trajectory.schema.json surely accepts (a plain-Python fast path: it is
    about 5x cheaper than jsonschema on logs with token ids). False means "ask the schema", never "invalid"."""
    if type(traj) is not dict or type(traj.get("id")) not in (str, int):
        return False
    msgs, tools = traj.get("messages"), traj.get("tools", [])
    return (type(msgs) is list and len(msgs) > 0 and all(map(_fast_message, msgs))
            and type(tools) is list and all(map(_fast_tool, tools)) and type(traj.get("meta", {})) is dict)


def _check(name: str, obj, prefix: str = "$") -> tuple[str, str] | None:
    """(json path, message) of the most relevant schema violation, or None if valid."""
    if name == "trajectory" and fast_valid(obj):
        return None
    err = jsonschema.exceptions.best_match(_validator(name).iter_errors(obj))
    if err is None:
        return None
    path = prefix + err.json_path[1:]
    if err.validator == "anyOf" and path.endswith("]"):
        return path, "assistant message needs a string 'content' or a non-empty 'tool_calls' list"
    return path, err.message


def _semantic_problem(traj: dict) -> tuple[str, str] | None:
    """Checks jsonschema cannot express: tool messages answer an earlier call; a prefill starts the content."""
    seen_ids: set[str] = set()
    for i, m in enumerate(traj["messages"]):
        for call in m.get("tool_calls") or []:
            if "id" in call:
                seen_ids.add(call["id"])
        if m["role"] == "tool" and seen_ids and m["tool_call_id"] not in seen_ids:
            return (f"$.messages[{i}].tool_call_id",
                    f"{m['tool_call_id']!r} does not match the id of any earlier assistant tool call")
        prefill = m.get("prefill")
        if isinstance(prefill, str) and not (m.get("content") or "").startswith(prefill):
            return (f"$.messages[{i}].prefill", f"the start of 'content' (the forced prefix of the reply); content "
                                                f"starts {(m.get('content') or '')[:len(prefill) + 10]!r}, not {prefill[:60]!r}")
    return None


def _source_path(path: str, conv: Converted, fmt: str) -> tuple[str, str]:
    """Map a path in the converted trajectory (`$.messages[4].tool_call_id`) back to the user's record."""
    if fmt == "messages":
        return path.replace("$.messages", "$", 1), ""
    if path.startswith("$.tools") and conv.tools_origin != "$.tools":  # tools from a system prompt
        return conv.tools_origin, f"in the <tools> block, {path[2:]}: "
    origins = conv.origins
    if fmt == "openai" or not path.startswith("$.messages["):
        return path, ""
    index, _, rest = path[len("$.messages["):].partition("]")
    if index.isdigit() and int(index) < len(origins) and origins[int(index)]:
        return origins[int(index)], f"in the message made from it, {rest.lstrip('.')}: " if rest.lstrip(".") else ""
    return path, ""


def _validated(conv: Converted, fmt: str, default_id: str | None) -> Trajectory:
    """Schema + semantic checks on a converted trajectory; FormatError with a path in the user's record."""
    traj = conv.traj
    if traj.get("id") is None:
        traj["id"] = default_id or "traj-" + content_hash({"messages": traj.get("messages"),
                                                           "tools": traj.get("tools") or []})[:12]
    problem = _check("trajectory", traj) or _semantic_problem(traj)
    if problem:
        path, msg = problem
        source, detail = _source_path(path, conv, fmt)
        raise FormatError(source, detail + msg)
    traj["id"] = str(traj["id"])
    return Trajectory.from_dict(traj)


def convert(obj, fmt: str) -> Converted:
    """One parsed record of a per-record format -> Converted (raises FormatError)."""
    if fmt == "sharegpt":
        problem = _check("sharegpt", obj)
        if problem:
            raise FormatError(*problem)
        return sharegpt.convert(obj)
    if fmt == "xlam":
        return xlam.convert(obj)
    if fmt == "messages":
        return Converted({"id": None, "messages": obj, "tools": [], "meta": {}})
    return Converted(dict(obj))


def normalise(obj, *, file: str = "<input>", line: int = 0, default_id: str | None = None) -> tuple[Trajectory, str]:
    """Validate one parsed record and return (Trajectory, format). Raises TrajectoryError.

    A record without an id gets `default_id` (the loader passes one unique per line), else a
    content hash. An OTLP export request must hold exactly one trace here (use iter_trajectories).
    """
    try:
        fmt = detect_format(obj)
        if fmt == "otel":
            spans, errors = otel.parse_request(obj)
            if errors:
                raise errors[0]
            trajs = [t for trace in _group(spans).values() for t in otel.assemble_trace(trace)]
            if len(trajs) != 1:
                raise FormatError("$", f"one trace with one conversation; found {len(trajs)} (read the file with iter_trajectories)")
            (traj, wheres), = trajs
            return _validated(Converted(traj, [w[2] for w in wheres]), fmt, None), fmt
        return _validated(convert(obj, fmt), fmt, default_id), fmt
    except FormatError as e:
        raise TrajectoryError(file, line, e.path, e.expected) from None
    except ValueError as e:  # detect_format
        raise TrajectoryError(file, line, "$", str(e)) from None


def _group(spans: list[otel.Span]) -> dict[str, list[otel.Span]]:
    traces: dict[str, list[otel.Span]] = {}
    for s in spans:
        traces.setdefault(s.trace_id, []).append(s)
    return traces


@dataclass
class LoadSummary:
    """Counts from reading trajectory inputs: valid records per format, rejected records."""

    per_format: Counter = field(default_factory=Counter)
    rejected: int = 0
    files: int = 0

    @property
    def valid(self) -> int:
        return sum(self.per_format.values())


class _Loader:
    """State of one iter_trajectories call: id registry, rejects, OTel spans waiting for their trace."""

    def __init__(self, rejects, summary: LoadSummary):
        self.rejects, self.summary = rejects, summary
        self.seen: dict[str, tuple[str, bool]] = {}  # id -> (where, made by the loader)
        self.spans: dict[str, list[otel.Span]] = {}  # trace id -> spans, in arrival order

    def reject(self, error: TrajectoryError, raw: str) -> None:
        if self.rejects is None:
            raise error
        self.summary.rejected += 1
        row = {"file": error.file, "line": error.line, "path": error.path, "error": error.expected, "raw": raw}
        if error.unit != "line":
            row["unit"] = error.unit
        self.rejects.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rejects.flush()

    def register(self, traj: Trajectory, given: bool, where: str, file: str, line: int, unit: str) -> None:
        """Ids are unique: a made id steps aside (`~2`); a given id that collides is the user's error."""
        if not given:
            base, n = traj.id, 1
            while traj.id in self.seen:
                n += 1
                traj.id = f"{base}~{n}"
        elif traj.id in self.seen:
            other, made = self.seen[traj.id]
            why = " (an id opsd made for that record, which has none)" if made else ""
            raise TrajectoryError(file, line, "$.id", f"a unique id; {traj.id!r} is also the id at {other}{why}", unit=unit)
        self.seen[traj.id] = (where, not given)

    def record(self, rec: RawRecord) -> Iterator[Trajectory]:
        where = f"{rec.file}:{rec.line}" if rec.unit == "line" else f"{rec.file} row {rec.line}"
        try:
            if rec.error is not None:
                raise FormatError("$", rec.error)
            try:
                fmt = detect_format(rec.obj)
            except ValueError as e:
                raise FormatError("$", str(e)) from None
            if fmt == "otel":
                self._spans(rec)
                return
            conv = convert(rec.obj, fmt)
            given = conv.traj.get("id") is not None
            traj = _validated(conv, fmt, rec.default_id)
        except FormatError as e:
            path = rec.prefix + e.path[1:] if e.path.startswith("$") else e.path
            self.reject(TrajectoryError(rec.file, rec.line, path, e.expected, unit=rec.unit), rec.raw)
            return
        try:
            self.register(traj, given, where, rec.file, rec.line, rec.unit)
        except TrajectoryError as e:
            self.reject(e, rec.raw)
            return
        self.summary.per_format[fmt] += 1
        yield traj

    def _spans(self, rec: RawRecord) -> None:
        spans, errors = otel.parse_request(rec.obj, rec.prefix)
        for s in spans:
            s.where = (rec.file, rec.line, s.where[2])
            self.spans.setdefault(s.trace_id, []).append(s)
        for e in errors:
            self.reject(TrajectoryError(rec.file, rec.line, e.path, e.expected, unit=rec.unit), rec.raw)

    def traces(self) -> Iterator[Trajectory]:
        """Trajectories of the OTel traces seen, in order of each trace's first span."""
        for trace_id, spans in self.spans.items():
            try:
                assembled = otel.assemble_trace(spans)
            except otel.SpanError as e:
                self.reject(TrajectoryError(e.file, e.line, e.path, e.expected), json.dumps({"traceId": trace_id}))
                continue
            for traj_dict, wheres in assembled:
                file, line = wheres[0][0], wheres[0][1]
                try:
                    traj = _validated(Converted(traj_dict, [w[2] for w in wheres]), "otel", None)
                    self.register(traj, True, f"{file}:{line} (trace {trace_id})", file, line, "line")
                except (FormatError, TrajectoryError) as e:
                    index = _message_index(e.path, wheres)
                    if index is not None:
                        file, line = wheres[index][0], wheres[index][1]
                    self.reject(TrajectoryError(file, line, e.path, e.expected),
                                json.dumps({"traceId": trace_id, "id": traj_dict["id"]}))
                    continue
                self.summary.per_format["otel"] += 1
                yield traj


def _message_index(path: str, wheres: list) -> int | None:
    for i, w in enumerate(wheres):
        if path.startswith(w[2]):
            return i
    return None


def iter_trajectories(paths: str | Path | Iterable[str | Path], *, rejects=None,
                      summary: LoadSummary | None = None) -> Iterator[Trajectory]:
    """Yield trajectories from the inputs, in input then record order (OTel traces after the rest).

    Without `rejects`, the first bad record raises TrajectoryError. With `rejects` (an open text
    file), bad records are written there as {"file", "line", "path", "error", "raw"} and counted in
    `summary.rejected`. Blank lines are skipped. An input that cannot be read at all raises
    TrajectoryError (a folder with no data files, an uncached hub id) or OSError (missing file).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    summary = summary if summary is not None else LoadSummary()
    loader = _Loader(rejects, summary)
    for p in paths:
        summary.files += 1
        try:
            for rec in iter_path_records(p):
                yield from loader.record(rec)
        except InputError as e:
            raise TrajectoryError(str(p), 0, "", str(e).removeprefix(f"{p}: ")) from None
    yield from loader.traces()


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
