"""`opsd critique`: locate the erroneous step of each trajectory and write a hint (resumable).

    opsd critique --in data/sample_openai.jsonl --out runs/critiques.jsonl --critic schema
    opsd critique --in rollouts.jsonl --out critiques.jsonl --critic schema+reference
    OPENAI_API_KEY=... opsd critique --in logs.jsonl --out critiques.jsonl --critic llm \
        --base-url http://localhost:8000/v1 --model my-model --concurrency 16 --timeout 60

    from opsd.critique.config import CriticConfig, CritiqueConfig
    from opsd.critique.run import main
    summary = main(CritiqueConfig(inputs=["logs.jsonl"], out="critiques.jsonl"))

The one place that composes `opsd` and `critic`: `build_critic(CriticConfig)` (the only one),
`main(CritiqueConfig) -> RunSummary`, `critique_fn(CriticConfig)` for the stages that critique
(eval, demo, loop) and `critic_reward` for GKD+RL. Output lines are `Critique.to_dict()` plus
`"key"` (trajectory id, hash of what the critic reads, critic config hash), appended and
fsynced one by one; rerunning skips what is done and retries transport failures, so after a
kill every trajectory ends up exactly once. Exit codes of the command: 0 done (failed critiques
are recorded, not fatal), 1 bad input, a fatal critic error (bad key/model/URL) or a failed run
(`RunSummary.error`: every critique failed, or too many transport failures), 2 bad options or
prompt template. API keys and URL credentials never reach stdout, stderr, logs or records.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Callable

from critic import CRITICS, DEFAULT_MAX_HINT_TOKENS, CriticFatalError, make_critic
from critic.llm import LLMConfig, PromptError
from critic.runner import (
    RunSummary,
    format_summary,
    read_critiques,
    record_key,
    run_critiques,
)
from critic.validate import check_critique
from opsd.critique.config import CriticConfig, CritiqueConfig
from opsd.io.trajectories import TrajectoryError, load_trajectories
from opsd.types import Critique, Trajectory

log = logging.getLogger(__name__)
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2")  # openai's HTTP client logs one INFO line per request


class CritiqueRunError(RuntimeError):
    """The run as a whole failed (`RunSummary.error`); what was done is recorded and resumable."""


def build_critic(cfg: CriticConfig):
    """The critic `cfg` describes. Raises ValueError (a missing API key included) or PromptError."""
    llm = None
    if cfg.uses_llm:
        llm = LLMConfig(base_url=cfg.base_url, model=cfg.model, api_key_env=cfg.api_key_env, prompt=cfg.prompt,
                        timeout=cfg.timeout, max_attempts=cfg.max_attempts, backoff=cfg.backoff, max_wait=cfg.max_wait,
                        max_reasks=cfg.max_reasks, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                        structured=cfg.structured, max_hint_tokens=cfg.max_hint_tokens)
    try:
        return make_critic(cfg.name, max_hint_tokens=cfg.max_hint_tokens, llm_config=llm)
    except CriticFatalError as e:  # no API key in the environment: an option to fix, not a server answer
        raise ValueError(f"api_key_env: {e}") from None


def _quiet_http_logs() -> None:
    """The HTTP client's per-request INFO line only with -v (debug logging); it is redacted then."""
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def critique(trajectories: list[Trajectory], cfg: CriticConfig, out: str | Path, *,
             progress: bool = True) -> tuple[RunSummary, list[str]]:
    """Critique `trajectories` into `out` with a fresh critic (resumable): the summary (its `error`
    says whether the run failed) and the record key of each trajectory, in order."""
    critic = build_critic(cfg)
    keys = [record_key(t, critic) for t in trajectories]
    _quiet_http_logs()
    summary = run_critiques(trajectories, critic, out, concurrency=cfg.concurrency, progress=progress,
                            retry_failed=cfg.retry_failed, max_transport_failure_share=cfg.max_transport_failure_share)
    return summary, keys


def main(cfg: CritiqueConfig) -> RunSummary:
    """Critique every trajectory of `cfg.inputs` into `cfg.out`. Raises ValueError/PromptError (options),
    TrajectoryError/OSError (input) and CriticFatalError (the server refused the key, model or URL)."""
    if not cfg.inputs:
        raise ValueError("inputs: give at least one trajectory log (--in FILE)")
    build_critic(cfg.critic)  # options and prompt errors before reading any input
    rejects = open(cfg.rejects, "w", encoding="utf-8") if cfg.rejects else None
    try:
        trajectories = load_trajectories(cfg.inputs, rejects=rejects)
    finally:
        if rejects:
            rejects.close()
    if cfg.limit is not None:
        trajectories = trajectories[:cfg.limit]
    return critique(trajectories, cfg.critic, cfg.out, progress=cfg.progress)[0]


def critique_fn(cfg: CriticConfig, *, concurrency: int | None = None, progress: bool = True,
                echo: Callable[[str], None] = print) -> Callable[[list[Trajectory], Path], list[Critique]]:
    """A `CritiqueFn` (trajectories, out_path) -> one critique per trajectory, in order, resumable
    through out_path (eval, demo, loop). A fresh critic per call. Raises CritiqueRunError when the run
    failed as a whole (`RunSummary.error`)."""
    if concurrency is not None:
        cfg = dataclasses.replace(cfg, concurrency=concurrency)

    def fn(trajs: list[Trajectory], out_path: Path) -> list[Critique]:
        summary, keys = critique(trajs, cfg, out_path, progress=progress)
        echo(format_summary(summary))
        if summary.error:
            raise CritiqueRunError(f"{out_path}: {summary.error}")
        last = read_critiques(out_path)
        return [last[k] for k in keys]

    return fn


def critic_reward(critic: CriticConfig | object) -> Callable[[list[Trajectory]], list[float]]:
    """GKD+RL reward_fn(trajectories) -> [1.0 | 0.0]: 1 when the (rule) critic finds no error in the
    trajectory and its last reply holds a parseable tool call, else 0 (a failed critique is 0)."""
    if isinstance(critic, CriticConfig):
        if critic.uses_llm:
            raise ValueError(f"name: the reward needs a rule critic, not {critic.name!r}")
        critic = build_critic(critic)

    async def verdicts(trajs: list[Trajectory]):
        return await asyncio.gather(*(critic.critique(t) for t in trajs))

    def reward_fn(trajs: list[Trajectory]) -> list[float]:
        out = []
        for t, c in zip(trajs, asyncio.run(verdicts(trajs))):
            c = check_critique(c, t, max_hint_tokens=critic.max_hint_tokens)
            called = bool(t.messages[-1].get("tool_calls")) and not t.meta.get("parse_error")
            out.append(1.0 if c.verdict == "ok" and called else 0.0)
        return out

    return reward_fn


# ---- the current `opsd critique` flags (the lead replaces them with flags generated from CritiqueConfig)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="LOGS",
                   help="JSONL trajectory logs (openai, bare message list or ShareGPT)")
    p.add_argument("--out", required=True, metavar="CRITIQUES.jsonl", help="append-only output (resumable)")
    p.add_argument("--critic", choices=CRITICS, default="schema", help="which critic (default: schema)")
    p.add_argument("--max-hint-tokens", type=int, default=DEFAULT_MAX_HINT_TOKENS,
                   help=f"hint length limit, approximate tokens (default {DEFAULT_MAX_HINT_TOKENS})")
    p.add_argument("--concurrency", type=int, default=8, help="critiques in flight at once (default 8)")
    p.add_argument("--limit", type=int, default=None, help="only the first N trajectories")
    p.add_argument("--rejects", default=None, help="write invalid input lines here and continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--retry-failed", choices=("transport", "none", "all"), default="transport",
                   help="failed records a rerun retries (default transport: server errors)")
    p.add_argument("--max-transport-failure-share", type=float, default=0.1,
                   help="fail the run when more than this share of critiques failed on transport errors (default 0.1)")
    g = p.add_argument_group("llm critic")
    g.add_argument("--base-url", default="https://api.openai.com/v1", help="OpenAI-compatible endpoint")
    g.add_argument("--model", default=None, help="model name (required for --critic llm)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY)")
    g.add_argument("--prompt", default=None, metavar="FILE",
                   help="custom Jinja2 prompt (default prompts/critic/locate_error.j2)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    g.add_argument("--max-attempts", type=int, default=5, help="transport attempts per request (default 5)")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds (default 1)")
    g.add_argument("--max-wait", type=float, default=30.0, help="cap on one retry wait (default 30)")
    g.add_argument("--max-reasks", type=int, default=2, help="re-asks of an invalid reply (default 2)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--max-tokens", type=int, default=512, help="completion budget per reply (default 512)")
    g.add_argument("--no-structured", action="store_true", help="do not send response_format")


def config_from_args(args) -> CritiqueConfig:
    critic = CriticConfig(name=args.critic, base_url=args.base_url, model=args.model or "", api_key_env=args.api_key_env,
                          prompt=args.prompt, timeout=args.timeout, max_attempts=args.max_attempts, backoff=args.backoff,
                          max_wait=args.max_wait, max_reasks=args.max_reasks, temperature=args.temperature,
                          max_tokens=args.max_tokens, structured=not args.no_structured,
                          max_hint_tokens=args.max_hint_tokens, concurrency=args.concurrency,
                          retry_failed=args.retry_failed, max_transport_failure_share=args.max_transport_failure_share)
    return CritiqueConfig(inputs=args.inputs, out=args.out, limit=args.limit, rejects=args.rejects,
                          progress=not args.no_progress, critic=critic)


def run(args) -> int:
    try:
        cfg = config_from_args(args)
        build_critic(cfg.critic)
    except ValueError as e:  # bad options, a missing API key or a bad prompt template (PromptError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = main(cfg)
    except CriticFatalError as e:
        print(f"error: {e}\nnothing was recorded for the remaining trajectories; fix it and rerun to resume",
              file=sys.stderr)
        return 1
    except PromptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrajectoryError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    if summary.error:
        print(f"error: {summary.error}", file=sys.stderr)
        return 1
    return 0
