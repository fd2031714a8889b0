"""`opsd` command line: one subcommand per stage or pipeline.

Every command's flags are generated from its Config dataclass (`opsd.config`, on tyro): the
help text is the field's, `--config FILE.yaml` sets any field and flags override it, nested
Configs are dotted (`opsd demo --train.lr 5e-5 --rollout.max-new-tokens 128`). The CLI builds
the Config, calls the stage's `main(cfg)`, prints the result and returns the exit code:

    0  done
    1  the run failed: bad input data, a stage error, items that failed and were recorded
    2  usage error: an unknown flag, a bad value, an inconsistent config (nothing was run)

All errors go to stderr. Only the chosen command's modules are imported, so one stage's
dependencies never slow down or break another command. This module, `opsd.critique` and
`opsd.pipelines` are the only places that compose `opsd` with the critic package (`opsd_critic`).

    opsd --help
    opsd train --help
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from opsd.config import parse
from opsd.types import StageError


def _validate(argv: list[str]) -> int:
    from opsd.logs import ValidateConfig, format_validate, validate_main

    result = validate_main(parse(ValidateConfig, argv, prog="opsd validate", description=COMMANDS["validate"][0]))
    print(format_validate(result))
    if result.warning:
        print(f"opsd validate: warning: {result.warning}", file=sys.stderr)
    return 0 if result.ok else 1


def _render(argv: list[str]) -> int:
    from opsd.logs import RenderConfig, render_main

    for item in render_main(parse(RenderConfig, argv, prog="opsd render", description=COMMANDS["render"][0])):
        print(f"════ {item.id}")
        print(item.text)
        if item.warning:
            print(f"warning: {item.warning}", file=sys.stderr)
    return 0


def _split(argv: list[str]) -> int:
    from opsd.split import SplitConfig, format_summary, main

    print(format_summary(main(parse(SplitConfig, argv, prog="opsd split", description=COMMANDS["split"][0]))))
    return 0


def _critique(argv: list[str]) -> int:
    from opsd_critic.llm import PromptError
    from opsd_critic.runner import format_summary
    from opsd.critique.config import CritiqueConfig
    from opsd.critique.run import build_critic, main

    cfg = parse(CritiqueConfig, argv, prog="opsd critique", description=COMMANDS["critique"][0])
    try:
        build_critic(cfg.critic)  # a bad prompt template or a missing API key is a usage error: nothing was sent
    except ValueError as e:
        print(f"opsd critique: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = main(cfg)
    except PromptError as e:  # found by rendering the template on a real trajectory, before any request
        print(f"opsd critique: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if summary.error:
        print(f"opsd critique: error: {summary.error}", file=sys.stderr)
        return 1
    return 0


def _rollout(argv: list[str]) -> int:
    from opsd.rollout.config import RolloutConfig
    from opsd.rollout.run import main

    summary = main(parse(RolloutConfig, argv, prog="opsd rollout", description=COMMANDS["rollout"][0]))
    print(json.dumps(summary))
    return 1 if summary["errors"] else 0


def _hint(argv: list[str]) -> int:
    from opsd.hint.config import HintConfig
    from opsd.hint.run import format_table, main

    cfg = parse(HintConfig, argv, prog="opsd hint", description=COMMANDS["hint"][0])
    report = main(cfg)
    print(format_table(report))
    print(f"\nexamples: {cfg.out}/examples.jsonl, table: {cfg.out}/hint_effects.md")
    return 0 if report.examples else 1


def _train(argv: list[str]) -> int:
    from opsd.train.config import TrainConfig
    from opsd.train.run import main

    cfg = parse(TrainConfig, argv, prog="opsd train", description=COMMANDS["train"][0])
    reward_fn = None
    if cfg.rl_alpha < 1.0:  # GKD+RL: the critic's verdict on each sampled reply is the reward
        from opsd_critic import make_critic
        from opsd.critique.run import critic_reward

        reward_fn = critic_reward(make_critic(cfg.reward))
    dest = main(cfg, reward_fn=reward_fn)  # a NonFiniteLossError is a StageError: one stderr line, exit 1
    print(f"model saved to {dest}")
    return 0


def _multi_turn_file(tasks: str) -> bool:
    """A task file whose tasks are all BFCL multi-turn episodes (as `bfcl:multi_turn_*` specs load them)."""
    from opsd.io.tasks import bfcl_multi_turn, load_tasks

    if tasks.startswith("bfcl:") or not Path(tasks).is_file():
        return False
    loaded = load_tasks(tasks)
    return bool(loaded) and all(bfcl_multi_turn.is_multi_turn(t.meta) for t in loaded)


def _eval(argv: list[str]) -> int:
    from opsd.critique.outcomes import reply_outcomes
    from opsd.critique.run import critique_fn
    from opsd.eval import multi_turn
    from opsd.eval.config import EvalConfig
    from opsd.eval.report import summary_table
    from opsd.eval.run import main

    cfg = parse(EvalConfig, argv, prog="opsd eval", description=COMMANDS["eval"][0])
    if cfg.logs:  # critiqued logs instead of tasks: teacher-forced only, no rollouts
        from opsd.eval import logs

        report = logs.main(cfg, critique_fn(cfg.critic) if not cfg.critiques else None)
        print(logs.summary_text(report))
        print(f"\nreport: {cfg.out}/report.md")
        return 0 if report["teacher_forced"].get("n_examples") else 1
    if multi_turn.is_multi_turn_spec(cfg.tasks) or _multi_turn_file(cfg.tasks):  # episodes in BFCL's simulated
        # environments, scored by BFCL's official multi-turn checker
        report = multi_turn.main(cfg, critique_fn(cfg.critic))
        print(multi_turn.markdown(report))
        print(f"\nreport: {cfg.out}/report.md")
        return 0
    report = main(cfg, critique_fn(cfg.critic), outcome_fn=reply_outcomes)
    print(summary_table(report))
    print(f"\nreport: {cfg.out}/report.md")
    return 0


def _loop(argv: list[str]) -> int:
    from opsd.pipelines.loop import LoopConfig, format_rounds, main

    history = main(parse(LoopConfig, argv, prog="opsd loop", description=COMMANDS["loop"][0]))
    print("\n" + format_rounds(history))
    return 0


def _demo(argv: list[str]) -> int:
    from opsd.pipelines.demo import DemoConfig, main

    main(parse(DemoConfig, argv, prog="opsd demo", description=COMMANDS["demo"][0]))
    return 0


def _compare(argv: list[str]) -> int:
    from opsd.pipelines.compare import CompareConfig, main

    main(parse(CompareConfig, argv, prog="opsd compare", description=COMMANDS["compare"][0]))
    return 0


def _serve(argv: list[str]) -> int:
    from opsd.serve.config import ServeConfig
    from opsd.serve.run import main

    main(parse(ServeConfig, argv, prog="opsd serve", description=COMMANDS["serve"][0]))
    return 0


# name -> (one-line help, runner(argv) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "validate": ("check trajectory logs and count them per format", _validate),
    "render": ("show a trajectory rendered with the chat template, with message boundaries", _render),
    "split": ("split logs into train and held-out; trajectories with the same first user turn stay together", _split),
    "rollout": ("sample student trajectories on tasks (BFCL or a task file)", _rollout),
    "critique": ("locate the erroneous step of each trajectory and write a hint", _critique),
    "hint": ("build hinted examples and measure each hint's effect, per error category", _hint),
    "train": ("OPSD/GKD training on critiqued trajectories", _train),
    "eval": ("measure how much errors were down-weighted, before vs after, on held-out tasks (or critiqued logs: "
             "--logs)", _eval),
    "loop": ("on-policy rounds: rollout -> critique -> train, each from the previous round's student", _loop),
    "demo": ("end-to-end run on the embedded model and BFCL", _demo),
    "compare": ("opsd vs dense, reward, rft and sft-gt on the same rollouts, steps and held-out tasks", _compare),
    "serve": ("run a vLLM server for token-exact rollouts (from .venv-vllm: make vllm) until Ctrl-C", _serve),
}


# name -> the Config its flags come from (tests walk every field of each and find its flag)
CONFIGS = {
    "validate": "opsd.logs:ValidateConfig",
    "render": "opsd.logs:RenderConfig",
    "split": "opsd.split:SplitConfig",
    "rollout": "opsd.rollout.config:RolloutConfig",
    "critique": "opsd.critique.config:CritiqueConfig",
    "hint": "opsd.hint.config:HintConfig",
    "train": "opsd.train.config:TrainConfig",
    "eval": "opsd.eval.config:EvalConfig",
    "loop": "opsd.pipelines.loop:LoopConfig",
    "demo": "opsd.pipelines.demo:DemoConfig",
    "compare": "opsd.pipelines.compare:CompareConfig",
    "serve": "opsd.serve.config:ServeConfig",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: opsd [-v] COMMAND [flags]   (opsd COMMAND --help for its flags)", "",
             "Targeted on-policy self-distillation for tool-calling agents.", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (help_, _) in COMMANDS.items()]
    lines += ["", "options:", "  -v, --verbose  debug logging (secrets are never logged)", "",
              "exit codes: 0 done, 1 the run failed (errors are recorded and printed), 2 usage error"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose = True
        argv.pop(0)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"opsd: unknown command {command!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[command][1](rest)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command " + ("with --resume (it continues from the newest complete "
              "checkpoint)" if command == "train" else "to resume"), file=sys.stderr)
        return 130
    except (ValueError, OSError, StageError) as e:  # bad input, a missing file, a stage that cannot go on: no traceback
        if verbose:
            logging.getLogger("opsd").exception("opsd %s failed", command)
        print(f"opsd {command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
