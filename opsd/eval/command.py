"""`opsd eval --before A --after B --tasks SPEC --out REPORT`: how much were errors down-weighted?

See `opsd.eval.run` for what is measured; writes REPORT/report.json, report.md and PNG plots.
"""
from __future__ import annotations

import sys

from opsd.critique.compose import add_critic_arguments, build_critic, critique_fn
from opsd.eval.run import EvalConfig


def add_arguments(p) -> None:
    d = EvalConfig()
    p.add_argument("--before", required=True, help="model A (before training)")
    p.add_argument("--after", required=True, help="model B (after training), e.g. RUN/model")
    p.add_argument("--tasks", default=d.tasks, help="held-out tasks: bfcl:CAT[,CAT...]:heldout or a task file")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--limit", type=int, default=d.limit, help="first N tasks (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rollout batch size")
    p.add_argument("--prefill", default=None, help="reply prefill (default: from --before)")
    p.add_argument("--placement", default=d.placement, choices=["user", "system", "inline"])
    p.add_argument("--span", default=d.span, choices=["quote", "step_from_error", "step"])
    p.add_argument("--train-run", default=None, help="training run folder, for training curves")
    p.add_argument("--device", default=None)
    add_critic_arguments(p)


def run(args) -> int:
    from opsd.eval.report import summary_table

    try:
        critic = build_critic(args)
        cfg = EvalConfig(before=args.before, after=args.after, tasks=args.tasks, out=args.out, limit=args.limit,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, prefill=args.prefill,
                         placement=args.placement, span=args.span, train_run=args.train_run, device=args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from opsd.eval.run import main

    report = main(cfg, critique_fn(critic, concurrency=args.critic_concurrency))
    print(summary_table(report))
    print(f"\nreport: {args.out}/report.md")
    return 0
