"""Raw records from log files: bytes -> one parsed JSON value per record, or the reason it has none.

- Compressed files (gzip, zstd, bz2, xz) are recognised by their magic bytes and read as streams.
- JSON lines are read and decoded one line at a time (memory stays bounded by the longest line):
  a line that is not UTF-8, not JSON, or nested deeper than `MAX_DEPTH` is a record with an `error`
  naming what was expected; the other lines go on. A UTF-8 byte-order mark is skipped.
- A JSON document (a pretty-printed object, several of them, or a JSON array of trajectories such
  as xLAM's `xlam_function_calling_60k.json`) is detected when its first lines are not JSON on their
  own; each array element is then a record that knows its line and index (`$[3]`).
- A line holding a JSON array of trajectory records is split into its elements the same way.
- Folders, Parquet/Arrow files, `datasets` folders and cached hub datasets go through `opsd.io.tables`.
"""
from __future__ import annotations

import bz2
import gzip
import io
import itertools
import json
import lzma
import re
import zlib
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

from opsd.io.formats import is_record_list

MAX_DEPTH = 100  # deepest JSON nesting accepted; trajectories need ~10, this leaves room for meta
BOM = b"\xef\xbb\xbf"
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_STREAM_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
_WS = re.compile(r"\s*")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB]")  # a \ud800-\udbff escape: check the pair is whole
_BAD_BYTES = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape


@dataclass
class RawRecord:
    """One record of an input, parsed (`obj`) or not (`error` says what was expected)."""

    file: str
    line: int  # 1-based line where the record starts (row number for tables)
    obj: object = None
    raw: str = ""  # the record's text, for the rejects file
    error: str | None = None
    prefix: str = "$"  # JSON path of the record inside its line or document ("$[3]")
    unit: str = "line"  # "line" or "row"
    default_id: str = ""  # id for a record that has none: unique per record


def compression(path: str | Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(6)
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def open_binary(path: str | Path) -> BinaryIO:
    """The file's bytes, decompressed if it is gzip, zstd, bz2 or xz (whatever its name)."""
    kind = compression(path)
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bz2":
        return bz2.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    if kind == "zstd":
        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def json_depth(obj) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion limit)."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, d)
            stack += [(v, d + 1) for v in (node.values() if isinstance(node, dict) else node) if isinstance(v, (dict, list))]
    return depth


def decode_error(e: json.JSONDecodeError, *, with_line: bool = False) -> str:
    where = f"line {e.lineno} column {e.colno}" if with_line else f"column {e.colno}"
    return f"valid JSON ({e.msg.removesuffix(' at')} at {where})"


def parse_json(text: str) -> tuple[object, str | None]:
    """(value, None) or (None, what was expected). Never raises for any input text."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, decode_error(e)
    except RecursionError:
        return None, f"JSON nested at most {MAX_DEPTH} levels deep"
    return obj, check_value(obj, text)


def check_value(obj, text: str) -> str | None:
    """Problems json.loads lets through: nesting deeper than MAX_DEPTH, lone UTF-16 surrogates."""
    if text.count("[") + text.count("{") > MAX_DEPTH and json_depth(obj) > MAX_DEPTH:
        return f"JSON nested at most {MAX_DEPTH} levels deep (found deeper nesting)"
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            return f"text without lone UTF-16 surrogate escapes (\\u{ord(e.object[e.start]):04x} has no pair)"
    return None


def _clean(text: str) -> str:
    """Text safe to write as UTF-8 (bytes that were not UTF-8 shown as \\xNN)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _BAD_BYTES.search(text) else text


def _lines(fh: BinaryIO) -> Iterator[tuple[int, bytes, str | None]]:
    """(line number, bytes, None) per line; a final (n, b"", reason) if the stream is corrupt."""
    lineno = 0
    try:
        for lineno, raw in enumerate(fh, start=1):
            yield lineno, raw, None
    except _STREAM_ERRORS as e:
        yield lineno + 1, b"", f"a readable compressed stream; it is corrupt or truncated after line {lineno} ({e})"


def _expand(rec: RawRecord) -> Iterator[RawRecord]:
    """A JSON array of trajectory records on one line -> one record per element."""
    if rec.error is None and is_record_list(rec.obj):
        for i, item in enumerate(rec.obj):
            yield RawRecord(rec.file, rec.line, item, json.dumps(item, ensure_ascii=False), None,
                            f"{rec.prefix}[{i}]", rec.unit, f"{rec.default_id}[{i}]")
    else:
        yield rec


def _line_record(file: str, name: str, lineno: int, raw: bytes) -> RawRecord | None:
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return RawRecord(file, lineno, raw=raw.decode("utf-8", "backslashreplace").rstrip("\r\n"),
                         error=f"UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid UTF-8; "
                               "re-encode the file as UTF-8)")
    obj, error = parse_json(text)
    return RawRecord(file, lineno, obj, text, error, default_id=f"{name}:{lineno}")


def _stripped(raw: bytes) -> bytes:
    return (raw[len(BOM):] if raw.startswith(BOM) else raw).strip()


def _parses(raw: bytes) -> bool:
    try:
        json.loads(_stripped(raw))
        return True
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False


def _is_document(nonblank: list[bytes]) -> bool:
    """A JSON document, not JSON lines: its first line opens a value that the line alone does not close,
    and so does the next line (a broken first line of a JSON-lines file is followed by a whole one)."""
    return (bool(nonblank) and _stripped(nonblank[0])[:1] in (b"[", b"{")
            and not any(_parses(raw) for raw in nonblank))


def iter_json_file(path: str | Path) -> Iterator[RawRecord]:
    """Records of a JSON-lines file or a JSON document (see the module docstring)."""
    file, name = str(path), Path(path).name
    with open_binary(path) as fh:
        lines = _lines(fh)
        head: list[tuple[int, bytes, str | None]] = []
        nonblank: list[bytes] = []
        for item in lines:  # buffer the first one or two non-blank lines, until the shape is known
            head.append(item)
            if item[2] is not None:
                break
            if _stripped(item[1]):
                nonblank.append(item[1])
                if len(nonblank) == 2 or _parses(item[1]):
                    break
        if nonblank and nonblank[0][:2] in _UTF16_BOMS:
            yield RawRecord(file, 1, raw=nonblank[0][:40].decode("utf-8", "backslashreplace"),
                            error="UTF-8 text; this file is UTF-16 (convert it: iconv -f UTF-16 -t UTF-8)")
            return
        if _is_document(nonblank) and head[-1][2] is None:
            chunks = [raw for _, raw, _ in head]
            stream_error = None
            for lineno, raw, err in lines:
                if err is not None:
                    stream_error = RawRecord(file, lineno, error=err)
                    break
                chunks.append(raw)
            data = b"".join(chunks)
            records = _Document(file, name, data).records()
            if records is not None:
                yield from records
                if stream_error is not None:
                    yield stream_error
                return
            head = [(i, raw, None) for i, raw in enumerate(chunks, start=1)]
            lines = iter([(stream_error.line, b"", stream_error.error)] if stream_error else [])
        for lineno, raw, err in itertools.chain(head, lines):
            if err is not None:
                yield RawRecord(file, lineno, error=err)
                return
            rec = _line_record(file, name, lineno, raw)
            if rec is not None:
                yield from _expand(rec)


class _Document:
    """A whole JSON document: one or more top-level values; a top-level array of records is split."""

    def __init__(self, file: str, name: str, data: bytes):
        self.file, self.name = file, name
        self.text = (data[len(BOM):] if data.startswith(BOM) else data).decode("utf-8", "surrogateescape")
        self.newlines = [m.start() for m in re.finditer("\n", self.text)]
        self.decoder = json.JSONDecoder()

    def line_col(self, pos: int) -> tuple[int, int]:
        """1-based line and 0-based column of a character position."""
        k = bisect_right(self.newlines, pos - 1)
        return k + 1, pos - (self.newlines[k - 1] + 1 if k else 0)

    def skip_ws(self, pos: int) -> int:
        return _WS.match(self.text, pos).end()

    def value_at(self, pos: int, prefix: str, default_id: str) -> tuple[RawRecord, int]:
        """The value starting at `pos` as a record, and the position after it (-1 if it does not parse)."""
        text, line = self.text, self.line_col(pos)[0]
        try:
            obj, end = self.decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            return RawRecord(self.file, e.lineno, raw=_clean(text[pos:pos + 200]), prefix=prefix,
                             error=decode_error(e, with_line=True)), -1
        except RecursionError:
            return RawRecord(self.file, line, raw=_clean(text[pos:pos + 200]), prefix=prefix,
                             error=f"JSON nested at most {MAX_DEPTH} levels deep"), -1
        chunk = text[pos:end]
        bad = _BAD_BYTES.search(chunk)
        if bad:
            bad_line, bad_col = self.line_col(pos + bad.start())
            return RawRecord(self.file, bad_line, raw=_clean(chunk), prefix=prefix,
                             error=f"UTF-8 text (a byte at line {bad_line} column {bad_col + 1} is not valid UTF-8)"), end
        return RawRecord(self.file, line, obj, chunk, check_value(obj, chunk), prefix, default_id=default_id), end

    def resync(self, after: int, column: int) -> int:
        """Start of the next line that opens a value at `column` (where pretty-printers put siblings), or -1."""
        m = re.compile("\n" + " " * column + "[\\[{]").search(self.text, after)
        return m.end() - 1 if m else -1

    def array(self, start: int) -> tuple[list[RawRecord], int]:
        """Records of the array opening at `start`, and the position after it (-1: the rest is unreadable)."""
        items: list[RawRecord] = []
        pos, i = self.skip_ws(start + 1), 0
        while pos < len(self.text) and self.text[pos] != "]":
            rec, end = self.value_at(pos, f"$[{i}]", f"{self.name}[{i}]")
            items.append(rec)
            i += 1
            if end < 0:  # skip to the next element laid out like this one, if elements sit on lines of their own
                own_line = self.line_col(pos)[0] != self.line_col(start)[0]
                pos = self.resync(pos, self.line_col(pos)[1]) if own_line else -1
                if pos < 0:
                    items.append(RawRecord(self.file, rec.line, prefix=f"$[{i}]", error="the rest of the JSON array "
                                           "(it could not be read after the error above)"))
                    return items, -1
                continue
            pos = self.skip_ws(end)
            if pos < len(self.text) and self.text[pos] == ",":
                pos = self.skip_ws(pos + 1)
            elif pos < len(self.text) and self.text[pos] != "]":
                items.append(RawRecord(self.file, self.line_col(pos)[0], raw=_clean(self.text[pos:pos + 80]),
                                       prefix=f"$[{i}]", error="',' or ']' after an array element"))
                return items, -1
        if pos >= len(self.text):
            items.append(RawRecord(self.file, self.line_col(len(self.text))[0], error="']' closing the JSON array "
                                   f"opened at line {self.line_col(start)[0]} (the file ends first)"))
            return items, -1
        return items, pos + 1

    def records(self) -> list[RawRecord] | None:
        """All records; None if the first value does not parse (the caller reads JSON lines instead)."""
        records: list[RawRecord] = []
        pos = self.skip_ws(0)
        while pos < len(self.text):
            if self.text[pos] == "[":
                items, end = self.array(pos)
                if not records and items and items[0].obj is None and (items[0].error or "").startswith("valid JSON"):
                    return None  # not even the first element parses: read the file as JSON lines
                objs = [r.obj for r in items]
                if is_record_list(objs) or any(r.error for r in items):
                    records += items
                else:  # a bare list of chat messages: one record
                    line = self.line_col(pos)[0]
                    records.append(RawRecord(self.file, line, objs, json.dumps(objs, ensure_ascii=False),
                                             default_id=f"{self.name}:{line}"))
            else:
                rec, end = self.value_at(pos, "$", f"{self.name}:{self.line_col(pos)[0]}")
                if end < 0 and not records:
                    return None
                records.append(rec)
                end = end if end >= 0 else self.resync(pos, 0)
            if end < 0:
                break
            pos = self.skip_ws(end)
        return records
