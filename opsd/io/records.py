"""Stage outputs: append-only resumable JSONL, `datasets` folders, and checks on paths.

Each record carries a `key`. A stage opens the file with `ResumableJsonl`, skips keys already
present, and appends one line per finished item, flushed and fsynced, so killing the process
at any point loses at most the line being written. A torn last line (no trailing newline or
invalid JSON) is cut off on reopen, so a rerun yields every item exactly once.

`write_records(path, records, format="jsonl"|"datasets")` writes a finished output either way
(a `datasets` folder reloads exactly: `read_records`). `check_input_file(path, what)` and
`check_output_file(path, what)` give a clear ValueError for a folder (or a missing file) where a
file is expected; Configs call them in `__post_init__`, e.g.

    check_output_file(self.out, "out")   # ValueError: out: runs/ is a folder; give a file path ...
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from opsd.io.tables import is_dataset_folder, load_dataset_records, save_dataset

RECORD_FORMATS = ("jsonl", "datasets")


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is an existing readable file; else ValueError('<what>: ...')."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what}: {p} is a folder; give a file (for example {p / 'trajectories.jsonl'})")
    if not p.exists():
        raise ValueError(f"{what}: {p} does not exist")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{what}: {p} is not readable")
    return p


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if a file can be written there (it may exist); else ValueError('<what>: ...')."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what}: {p} is a folder; give a file path inside it (for example {p / 'out.jsonl'})")
    parent = next((a for a in p.parents if a.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"{what}: {p} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent if not p.exists() else p, os.W_OK):
        raise ValueError(f"{what}: {p} is not writable")
    return p


def write_records(path: str | os.PathLike, records: Iterable[dict], *, format: str = "jsonl") -> int:
    """Write a stage's output as JSONL (one record per line) or as a `datasets` folder; returns the count."""
    if format not in RECORD_FORMATS:
        raise ValueError(f"format: one of {', '.join(RECORD_FORMATS)}, got {format!r}")
    if format == "datasets":
        if Path(path).exists() and not Path(path).is_dir():
            raise ValueError(f"{path} is a file; a datasets output is a folder")
        return save_dataset(path, records)
    check_output_file(path, "output")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """Records of a JSONL file or of a `datasets` folder written by `write_records`."""
    if Path(path).is_dir() and is_dataset_folder(Path(path)):
        yield from load_dataset_records(path)
    else:
        yield from read_jsonl(path)


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


def read_latest(path: str | Path, *, key_field: str = "key") -> list[dict]:
    """The records of an append-only keyed file, the LAST one of each key (a retried failure supersedes the
    failure), in the order keys first appear; records without the key field are all kept."""
    latest: dict = {}
    for i, rec in enumerate(read_jsonl(path)):
        k = rec.get(key_field)
        latest[(0, k) if k is not None else (1, i)] = rec  # re-assigning keeps the first position
    return list(latest.values())


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
