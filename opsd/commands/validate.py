"""`opsd validate FILE... [--rejects PATH]`: check trajectory logs, print counts per format.

Without --rejects, the first invalid line stops the run (exit 1) with
`FILE:LINE: <json path>: <what was expected>`. With --rejects, bad lines go to PATH with their
reason, validation continues, and the summary counts them (exit 1 if any were rejected).
"""
from __future__ import annotations

import sys

from opsd.trajectories import FORMATS, LoadSummary, TrajectoryError, iter_trajectories


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", help="JSONL trajectory logs (openai, bare message list, or ShareGPT)")
    p.add_argument("--rejects", help="write invalid lines here (JSONL with file, line, path, error, raw) and continue")


def run(args) -> int:
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
