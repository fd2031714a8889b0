"""`opsd render FILE [--id ID] [--model M]`: show trajectories rendered with the chat template.

Message boundaries and token spans are printed so you can see exactly what the model reads.
"""
from __future__ import annotations

import sys

from opsd.trajectories import TrajectoryError, iter_trajectories


def add_arguments(p) -> None:
    p.add_argument("file", help="JSONL trajectory log")
    p.add_argument("--id", help="only this trajectory id (default: the first)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="tokenizer / chat template to use")
    p.add_argument("--all", action="store_true", help="render every trajectory in the file")


def run(args) -> int:
    from opsd.models import load_tokenizer
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
