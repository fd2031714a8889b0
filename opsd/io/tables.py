"""`datasets` as the data layer: Parquet/Arrow files, folders, `save_to_disk` folders, cached hub datasets.

Reading (`iter_path_records`, used by `opsd.io.trajectories` for every input path):
- a JSON-lines / JSON file (plain or compressed) -> `opsd.io.sources.iter_json_file` (line by line);
- a `.parquet` or `.arrow` file -> its rows, streamed through `datasets` (bounded memory);
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` -> its rows (memory-mapped);
- any other folder -> every data file in it (sorted, recursively);
- `owner/name` or `owner/name:split` that is not a local path -> that hub dataset, ONLY if it is already
  in the local cache (hub snapshot or prepared `datasets` cache). Nothing is ever downloaded.

Writing (`save_dataset`): records -> a `save_to_disk` folder. Scalar columns that hold one type in
every row are stored natively; any other column is stored as JSON text and listed in the dataset's
description (`{"opsd": {"json_columns": [...]}}`), so `load_dataset_records` gives back exactly the
records that were written (no Arrow struct unification, no int -> float, no added nulls).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from opsd.io.sources import RawRecord, iter_json_file

TABLE_SUFFIXES = (".parquet", ".arrow")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
_SCALARS = (str, bool, int, float)


class InputError(ValueError):
    """An input path that cannot be read as trajectories (names the path and what was expected)."""


def is_data_file(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in JSON_SUFFIXES + TABLE_SUFFIXES


def is_dataset_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                     and (path / "dataset_info.json").is_file())


def _drop_nulls(value):
    """Arrow gives every row every struct field, with None where the record had none: drop those."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _json_columns(description: str | None) -> list[str] | None:
    try:
        return list(json.loads(description or "")["opsd"]["json_columns"])
    except (ValueError, KeyError, TypeError):
        return None


def _decode_row(row: dict, json_columns: list[str] | None) -> dict:
    if json_columns is None:  # written by someone else: Arrow types
        return _drop_nulls(row)
    return {k: (json.loads(v) if k in json_columns else v) for k, v in row.items() if v is not None}


def _rows(dataset, label: str, name: str) -> Iterator[RawRecord]:
    json_columns = _json_columns(getattr(getattr(dataset, "info", None), "description", None))
    for n, row in enumerate(dataset, start=1):
        try:
            obj, error = _decode_row(row, json_columns), None
        except (ValueError, TypeError) as e:
            obj, error = None, f"a row whose JSON columns decode ({e})"
        yield RawRecord(label, n, obj, "" if obj is None else json.dumps(obj, ensure_ascii=False, default=str),
                        error, unit="row", default_id=f"{name}:row{n}")


def _empty_split(path: Path) -> bool:
    try:
        return json.loads((path / "state.json").read_text("utf-8")).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def iter_dataset_folder(path: Path) -> Iterator[RawRecord]:
    """Rows of a `save_to_disk` folder (every split of a DatasetDict, in order); a broken folder is a reject."""
    yield from _guarded(_dataset_folder_rows(path), str(path), "a readable datasets save_to_disk folder")


def _dataset_folder_rows(path: Path) -> Iterator[RawRecord]:
    import datasets  # heavy: only when a table is read

    if _empty_split(path):  # `datasets` cannot load a saved split with no data files: it has no rows
        return
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        for split, part in ds.items():
            yield from _rows(part, f"{path}[{split}]", f"{path.name}[{split}]")
    else:
        yield from _rows(ds, str(path), path.name)


def _guarded(rows: Iterator[RawRecord], file: str, what: str) -> Iterator[RawRecord]:
    """Rows until the reader fails; then one record saying where reading stopped (rows before it are kept)."""
    n = 0
    try:
        for rec in rows:
            n = rec.line
            yield rec
    except Exception as e:  # pyarrow/datasets raise many types (ArrowInvalid, DatasetGenerationError, OSError, ...)
        yield RawRecord(file, n + 1, unit="row", error=f"{what}; reading stopped at row {n + 1}: "
                                                       f"{type(e).__name__}: {str(e)[:300]}")


def _table_rows(path: Path) -> Iterator[RawRecord]:
    import datasets

    if path.suffix.lower() == ".arrow":
        try:
            ds = datasets.Dataset.from_file(str(path))  # memory-mapped; the files `datasets` writes
        except ValueError:  # ArrowInvalid: an Arrow IPC *file* rather than a stream: the arrow builder reads it
            ds = datasets.load_dataset("arrow", data_files=str(path), split="train", streaming=True)
    else:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    yield from _rows(ds, str(path), path.name)


def iter_table_file(path: Path) -> Iterator[RawRecord]:
    """Rows of a Parquet or Arrow file, streamed (nothing is copied into a cache); a broken file is a reject."""
    kind = "Arrow" if path.suffix.lower() == ".arrow" else "Parquet"
    yield from _guarded(_table_rows(path), str(path), f"a readable {kind} file")


def iter_folder(path: Path) -> Iterator[RawRecord]:
    if is_dataset_folder(path):
        yield from iter_dataset_folder(path)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise InputError(f"{path}: a log file, a datasets save_to_disk folder, or a folder of data files "
                         f"({', '.join(JSON_SUFFIXES + TABLE_SUFFIXES)}, optionally compressed); found none in it")
    for f in files:
        yield from iter_file(f)


def iter_file(path: Path) -> Iterator[RawRecord]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in TABLE_SUFFIXES:
        yield from iter_table_file(path)
    else:
        yield from iter_json_file(path)


def hub_cache_folder(repo_id: str) -> Path | None:
    """The local snapshot of a hub dataset, or None. Never touches the network."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE))
    except (OSError, ValueError):  # LocalEntryNotFoundError (not cached), HFValidationError (not a repo id)
        return None


def iter_hub(spec: str) -> Iterator[RawRecord]:
    """A hub dataset id (`owner/name[:split]`) that is already in the local cache."""
    repo_id, _, split = spec.partition(":")
    folder = hub_cache_folder(repo_id)
    if folder is not None:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_data_file(p)
                       and (not split or split in p.relative_to(folder).parts or p.name.startswith(split)))
        if files:
            for f in files:
                for rec in iter_file(f):
                    rec.default_id = f"{spec}:{rec.default_id}"
                    yield rec
            return
    import datasets

    prepared = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    arrows = sorted(p for p in prepared.glob("*/*/*/*.arrow") if not split or f"-{split}" in p.name)
    if not arrows:
        raise InputError(f"{spec}: a hub dataset in the local cache; it is not there and opsd never downloads "
                         f"(fetch it first: `hf download --repo-type dataset {repo_id}` or datasets.load_dataset('{repo_id}'))")
    for p in arrows:
        yield from _rows(datasets.Dataset.from_file(str(p)), f"{spec}[{p.stem}]", f"{spec}:{p.stem}")


def iter_path_records(spec: str | Path) -> Iterator[RawRecord]:
    """Every record of one input: a file, a folder, or a cached hub dataset id."""
    path = Path(spec)
    if path.is_dir():
        yield from iter_folder(path)
    elif path.exists():
        yield from iter_file(path)
    elif isinstance(spec, str) and _HUB_ID.match(spec) and not path.parent.is_dir():
        yield from iter_hub(spec)
    else:
        raise FileNotFoundError(f"{spec}: no such file or folder (nor a cached hub dataset id owner/name)")


def _native(values: list) -> bool:
    """A column Arrow can store exactly: one scalar type in every row, ints within int64."""
    kinds = {type(v) for v in values}
    if len(kinds) != 1 or next(iter(kinds)) not in _SCALARS:
        return False
    return kinds != {int} or all(-2**63 <= v < 2**63 for v in values)


def save_dataset(path: str | Path, records: Iterable[dict]) -> int:
    """Write records as a `datasets` folder (`load_from_disk`-able); returns the count. Exact round trip."""
    import datasets

    rows = list(records)
    columns: list[str] = list(dict.fromkeys(k for r in rows for k in r))
    json_columns = [c for c in columns if not (all(c in r for r in rows) and _native([r[c] for r in rows]))]
    data = {c: [(json.dumps(r[c], ensure_ascii=False) if c in r else None) if c in json_columns else r[c]
                for r in rows] for c in columns}
    if not rows:  # Arrow cannot store a table with no columns
        data = {"_empty": []}
    ds = datasets.Dataset.from_dict(data, features=None if rows else datasets.Features({"_empty": datasets.Value("string")}))
    # JSON columns hold strings (None where a record had no such key)
    ds.info.description = json.dumps({"opsd": {"json_columns": json_columns}})
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # no "Saving the dataset" bar on a stage's stderr
    try:
        ds.save_to_disk(str(path))
    finally:
        if not bars_were_off:
            datasets.utils.enable_progress_bars()
    return len(rows)


def load_dataset_records(path: str | Path) -> Iterator[dict]:
    """The records `save_dataset` wrote (or the rows of any `save_to_disk` folder, nulls dropped)."""
    for rec in iter_dataset_folder(Path(path)):
        if rec.error:
            raise ValueError(f"{rec.file}: row {rec.line}: {rec.error}")
        yield rec.obj
