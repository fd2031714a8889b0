"""`opsd validate` and `opsd render`: inspect trajectory logs.

`opsd validate INPUT... [--rejects PATH] [--out PATH]`: check logs in any format the loader reads
(JSON lines or documents, compressed or not, Parquet/Arrow, `datasets` folders, cached hub ids),
count them per format, and optionally write them normalised (JSONL or a `datasets` folder).

Without --rejects, the first invalid record stops the run (exit 1) with
`FILE:LINE: <json path>: <what was expected>`. With --rejects, bad records go to PATH with their
reason, validation continues, and the summary counts them (exit 1 if any were rejected).

An input that holds no trajectory at all is named in a warning (stderr), and a run where no input
held one exits 1. The `--rejects` file's folder is created when it is missing.

`read_logs` and `read_critiques` are how every stage that takes logs reads them (hint, train, eval
--logs): several inputs, an optional rejects file, the same warnings.

`opsd render FILE [--id ID | --all]`: show trajectories rendered with a model's chat template, with
message boundaries and token counts, and a warning when one is longer than the model's context.

    from opsd.logs import ValidateConfig, validate_main
    result = validate_main(ValidateConfig(inputs=["data/sample_otel.jsonl"], rejects="rejects.jsonl"))
    print(format_validate(result))
"""
from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Iterable

import tyro

from opsd.io.records import RECORD_FORMATS, check_output_file, read_latest, write_records
from opsd.io.trajectories import (
    FORMATS,
    LoadSummary,
    TrajectoryError,
    iter_trajectories,
)
from opsd.types import Critique, Trajectory

DEFAULT_RENDER_MODEL = "smollm2-135m-instruct"
log = logging.getLogger("opsd.logs")


def as_paths(value: str | Iterable[str] | None) -> list[str]:
    """A Config's input field as a list of paths: one string (older configs and callers) or a list; "" = none."""
    if not value:
        return []
    return [value] if isinstance(value, (str, Path)) else [str(v) for v in value]


def open_rejects(path: str | None, what: str = "rejects") -> IO[str] | None:
    """The rejects file opened for writing, its folder created when missing (None: no rejects file)."""
    if not path:
        return None
    p = check_output_file(path, what)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p.open("w", encoding="utf-8")


def _empty_inputs(paths: list[str]) -> list[str]:
    """The inputs that are plain files with nothing but whitespace in them (cheap: only small files are read)."""
    empty = []
    for p in map(Path, paths):
        if p.is_file() and p.stat().st_size < 4096 and p.suffix not in (".gz", ".zst", ".parquet", ".arrow") \
                and not p.read_bytes().strip():
            empty.append(str(p))
    return empty


def empty_warning(paths: list[str], summary: LoadSummary, what: str = "inputs") -> str | None:
    """The warning for inputs that held no trajectory; None when every input held one."""
    empty = _empty_inputs(paths)
    if summary.valid == 0 and summary.rejected == 0:
        return f"{what}: no trajectory in {', '.join(paths)} (empty input?)"
    if empty:
        return f"{what}: {', '.join(empty)} holds no trajectory (empty file)"
    return None


def read_logs(paths: str | Iterable[str], *, rejects: str | None = None, what: str = "trajectories",
              write_rejects: bool = True) -> tuple[list[Trajectory], LoadSummary]:
    """Every trajectory of `paths` (in order), with bad records written to `rejects` (created with its folder)
    instead of stopping the run; warns when the inputs hold no trajectory. `write_rejects=False` skips bad
    records without writing them (the other processes of a distributed run: one process writes the file)."""
    paths = as_paths(paths)
    if not paths:
        raise ValueError(f"{what}: give at least one log file")
    summary = LoadSummary()
    with ExitStack() as stack:
        fh = None
        if rejects:
            fh = stack.enter_context(open_rejects(rejects) if write_rejects else open(os.devnull, "w"))
        trajs = list(iter_trajectories(paths, rejects=fh, summary=summary))
    if summary.rejected:
        log.warning("%s: %d invalid record(s) skipped, written to %s", what, summary.rejected, rejects)
    warning = empty_warning(paths, summary, what)
    if warning:
        log.warning(warning)
    return trajs, summary


def read_critiques(paths: str | Iterable[str]) -> list[Critique]:
    """The critiques of one or more files written by `opsd critique`: the newest record per key in each (a
    retried failure supersedes it), files in order."""
    return [Critique.from_dict(d) for p in as_paths(paths) for d in read_latest(p)]


@dataclass
class ValidateConfig:
    inputs: Annotated[list[str], tyro.conf.Positional] = field(default_factory=list, metadata={
        "help": "trajectory logs: JSONL/JSON files (optionally .gz/.zst), Parquet/Arrow files, folders, "
                "datasets save_to_disk folders, or hub dataset ids already in the local cache"})
    rejects: str | None = field(default=None, metadata={
        "help": "write invalid records here (JSONL with file, line, path, error, raw) and continue"})
    out: str | None = field(default=None, metadata={"help": "also write the valid trajectories here, normalised"})
    out_format: str = field(default="jsonl", metadata={"help": "format of --out: jsonl (a file) | datasets (a folder)"})

    def __post_init__(self) -> None:
        if self.out_format not in RECORD_FORMATS:
            raise ValueError(f"out_format: one of {', '.join(RECORD_FORMATS)}, got {self.out_format!r}")
        if self.rejects is not None:
            check_output_file(self.rejects, "rejects")
        if self.out is not None and self.out_format == "jsonl":
            check_output_file(self.out, "out")


@dataclass
class ValidateResult:
    summary: LoadSummary
    rejects: str | None = None
    out: str | None = None
    written: int = 0
    warning: str | None = None  # inputs that held no trajectory

    @property
    def ok(self) -> bool:
        """No record was rejected and at least one trajectory was read."""
        return self.summary.rejected == 0 and self.summary.valid > 0


def validate_main(cfg: ValidateConfig) -> ValidateResult:
    """Read every input; raises TrajectoryError on the first bad record unless `cfg.rejects` is set,
    OSError for a missing input, ValueError for an empty input list."""
    if not cfg.inputs:
        raise ValueError("inputs: give at least one log file, folder or cached hub dataset id")
    summary = LoadSummary()
    result = ValidateResult(summary, cfg.rejects, cfg.out)
    with ExitStack() as stack:
        rejects = stack.enter_context(open_rejects(cfg.rejects)) if cfg.rejects else None
        trajectories = iter_trajectories(cfg.inputs, rejects=rejects, summary=summary)
        if cfg.out is None:
            for _ in trajectories:  # streamed: memory stays bounded by one record
                pass
        else:
            result.written = write_records(cfg.out, (t.to_dict() for t in trajectories), format=cfg.out_format)
    result.warning = empty_warning(list(cfg.inputs), summary, "inputs")
    return result


def format_validate(result: ValidateResult) -> str:
    s = result.summary
    counts = ", ".join(f"{fmt} {s.per_format.get(fmt, 0)}" for fmt in FORMATS)
    line = (f"{s.valid} valid trajectories in {s.files} input(s): {counts}; rejected {s.rejected}"
            + (f" (see {result.rejects})" if s.rejected and result.rejects else ""))
    return line + (f"\nwrote {result.written} to {result.out}" if result.out else "")


@dataclass
class RenderConfig:
    input: Annotated[str, tyro.conf.Positional] = field(default="", metadata={
        "help": "trajectory log (any input `opsd validate` reads)"})
    id: str | None = field(default=None, metadata={"help": "only this trajectory id (default: the first)"})
    model: str = field(default=DEFAULT_RENDER_MODEL, metadata={"help": "tokenizer / chat template to use"})
    all: bool = field(default=False, metadata={"help": "render every trajectory in the input"})
    max_positions: int | None = field(default=None, metadata={
        "help": "context length to warn against (default: the model's max_position_embeddings)"})

    def __post_init__(self) -> None:
        if self.max_positions is not None and self.max_positions < 1:
            raise ValueError(f"max_positions: must be >= 1, got {self.max_positions}")


@dataclass
class RenderedTrajectory:
    id: str
    text: str  # opsd.render.format_rendered: message boundaries and token counts
    n_tokens: int
    warning: str | None = None  # set when the trajectory does not fit the model's context


def render_main(cfg: RenderConfig) -> list[RenderedTrajectory]:
    """Render the chosen trajectories; raises TrajectoryError/ValueError (bad input, unknown id), OSError."""
    from opsd.io.models import load_tokenizer
    from opsd.render import context_limit, context_warning, format_rendered, render

    if not cfg.input:
        raise ValueError("input: give a trajectory log to render")
    tok = load_tokenizer(cfg.model)
    limit = cfg.max_positions or context_limit(cfg.model, tok)
    shown: list[RenderedTrajectory] = []
    for traj in iter_trajectories(cfg.input):
        if cfg.id is not None and traj.id != cfg.id:
            continue
        r = render(traj, tok)
        shown.append(RenderedTrajectory(traj.id, format_rendered(r, traj), len(r.input_ids),
                                        context_warning(traj.id, len(r.input_ids), limit)))
        if not cfg.all:
            break
    if not shown:
        what = f"no trajectory with id {cfg.id!r}" if cfg.id is not None else "no valid trajectory"
        raise ValueError(f"{what} in {cfg.input}")
    return shown
