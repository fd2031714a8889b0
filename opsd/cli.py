"""`opsd` command line. Each subcommand lives in the module named in COMMANDS, which exposes
`add_arguments(parser)` and `run(args) -> int`. This is the one place that composes `opsd` with
the `critic` package.

    opsd --help
    opsd validate data/*.jsonl
    opsd render data/sample_openai.jsonl --id weather-missing-arg
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module, one-line help, issue that delivers it)
COMMANDS = {
    "validate": ("opsd.logs:validate", "check trajectory logs and count them per format", None),
    "render": ("opsd.logs:render", "show a trajectory rendered with the chat template, with message boundaries", None),
    "rollout": ("opsd.rollout.run", "sample student trajectories on tasks (BFCL or a task file)", "rollouts (issue 5)"),
    "critique": ("opsd.critique.run", "locate the erroneous step of each trajectory and write a hint", "the critic (issue 3)"),
    "train": ("opsd.train.command", "OPSD/GKD training on critiqued trajectories", "the training core (issue 4)"),
    "eval": ("opsd.eval.command", "measure how much errors were down-weighted (before vs after)", "evaluation (issue 5)"),
    "loop": ("opsd.pipelines.loop", "on-policy rounds: rollout -> critique -> train", "the on-policy loop (issue 5)"),
    "demo": ("opsd.pipelines.demo", "end-to-end run on the embedded model and BFCL", None),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None  # the module itself does not exist yet
        raise


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (so one stage's imports never break another)."""
    parser = argparse.ArgumentParser(prog="opsd", description="Targeted on-policy self-distillation for tool-calling agents.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_, pending) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        module, _, suffix = module.partition(":")
        mod = _load(module) if name == command else None
        add, run = (f"add_{suffix}_arguments", f"run_{suffix}") if suffix else ("add_arguments", "run")
        if mod is not None and hasattr(mod, add):
            getattr(mod, add)(p)
            p.set_defaults(_run=getattr(mod, run))
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(_run=None, _pending=pending or "a later issue")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.command:
        parser.print_help()
        return 2
    if args._run is None:
        print(f"opsd {args.command}: not implemented yet; it arrives with {args._pending}.", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
