"""`opsd validate` and `opsd render`: inspect trajectory logs.

`opsd validate FILE... [--rejects PATH]`: check trajectory logs, print counts per format.

Without --rejects, the first invalid line stops the run (exit 1) with
`FILE:LINE: <json path>: <what was expected>`. With --rejects, bad lines go to PATH with their
reason, validation continues, and the summary counts them (exit 1 if any were rejected).
"""
from __future__ import annotations

import sys

from opsd.io.trajectories import (
    FORMATS,
    LoadSummary,
    TrajectoryError,
    iter_trajectories,
)


def add_validate_arguments(p) -> None:
    p.add_argument("files", nargs="+", help="JSONL trajectory logs (openai, bare message list, or ShareGPT)")
    p.add_argument("--rejects", help="write invalid lines here (JSONL with file, line, path, error, raw) and continue")


def run_validate(args) -> int:
    summary = LoadSummary()
    rejects = open(args.rejects, "w", encoding="utf-8") if args.rejects else None
    try:
        for _ in iter_trajectories(args.files, rejects=rejects, summary=summary):
            pass
    except TrajectoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if rejects:
            rejects.close()
    counts = ", ".join(f"{fmt} {summary.per_format.get(fmt, 0)}" for fmt in FORMATS)
    print(f"{summary.valid} valid trajectories in {summary.files} file(s): {counts}; rejected {summary.rejected}"
          + (f" (see {args.rejects})" if summary.rejected else ""))
    return 1 if summary.rejected else 0

def add_render_arguments(p) -> None:
    p.add_argument("file", help="JSONL trajectory log")
    p.add_argument("--id", help="only this trajectory id (default: the first)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="tokenizer / chat template to use")
    p.add_argument("--all", action="store_true", help="render every trajectory in the file")


def run_render(args) -> int:
    from opsd.io.models import load_tokenizer
    from opsd.render import format_rendered, render

    tok = load_tokenizer(args.model)
    shown = 0
    try:
        for traj in iter_trajectories(args.file):
            if args.id is not None and traj.id != args.id:
                continue
            print(f"════ {traj.id}")
            print(format_rendered(render(traj, tok), traj))
            shown += 1
            if not args.all and args.id is None:
                break
    except TrajectoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not shown:
        print(f"error: no trajectory with id {args.id!r} in {args.file}", file=sys.stderr)
        return 1
    return 0
