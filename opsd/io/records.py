"""Append-only, resumable JSONL output shared by long stages (rollout, critique).

Each record carries a `key`. A stage opens the file with `ResumableJsonl`, skips keys already
present, and appends one line per finished item, flushed and fsynced, so killing the process
at any point loses at most the line being written. A torn last line (no trailing newline or
invalid JSON) is cut off on reopen, so a rerun yields every item exactly once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield records from a JSONL file; raises ValueError naming FILE:LINE on a bad line."""
    with Path(path).open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: $: valid JSON ({e.msg})") from None


def _repair_tail(path: Path) -> int:
    """Cut a torn final line left by a killed writer; returns bytes removed."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    cut = len(data)
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[last_start:])
        except json.JSONDecodeError:
            cut = last_start
    if cut != len(data):
        with path.open("r+b") as f:
            f.truncate(cut)
    return len(data) - cut


class ResumableJsonl:
    """Append-only JSONL keyed by `record[key_field]`.

        with ResumableJsonl(out, key_field="key") as out:
            for item in items:
                if item.key in out: continue
                out.append({...,"key": item.key})
    """

    def __init__(self, path: str | Path, *, key_field: str = "key"):
        self.path = Path(path)
        self.key_field = key_field
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = _repair_tail(self.path)
        self.done: dict[str, dict] = {}
        if self.path.exists():
            for rec in read_jsonl(self.path):
                self.done[rec[key_field]] = rec
        self._f = self.path.open("a", encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def __len__(self) -> int:
        return len(self.done)

    def append(self, record: dict) -> None:
        key = record[self.key_field]
        if key in self.done:
            raise ValueError(f"duplicate key {key!r} in {self.path}")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done[key] = record

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
