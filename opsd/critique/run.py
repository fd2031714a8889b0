"""`opsd critique`: locate the erroneous step of each trajectory and write a hint (resumable).

    opsd critique --in data/sample_openai.jsonl --out runs/critiques.jsonl --critic.name schema
    opsd critique --in rollouts.jsonl --out critiques.jsonl --critic.name schema+reference
    OPENAI_API_KEY=... opsd critique --in logs.jsonl --out critiques.jsonl --critic.name llm \
        --critic.base-url http://localhost:8000/v1 --critic.model my-model --critic.concurrency 16 --critic.timeout 60

    from opsd.critique.config import CriticConfig, CritiqueConfig
    from opsd.critique.run import main
    summary = main(CritiqueConfig(inputs=["logs.jsonl"], out="critiques.jsonl"))

The one place that composes `opsd` and `opsd_critic`: `build_critic(CriticConfig)` (the only one),
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

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Callable

from opsd_critic import CriticFatalError, make_critic
from opsd_critic.llm import LLMConfig
from opsd_critic.runner import (
    RunSummary,
    format_summary,
    read_critiques,
    record_key,
    run_critiques,
)
from opsd_critic.validate import check_critique
from opsd.critique.config import CriticConfig, CritiqueConfig
from opsd.io.records import read_latest, write_records
from opsd.io.trajectories import LoadSummary, load_trajectories
from opsd.logs import empty_warning, open_rejects
from opsd.types import Critique, StageError, Trajectory

log = logging.getLogger(__name__)
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2")  # openai's HTTP client logs one INFO line per request


class CritiqueRunError(StageError):
    """The run as a whole failed (`RunSummary.error`); what was done is recorded and resumable."""


def build_critic(cfg: CriticConfig):
    """The critic `cfg` describes. Raises ValueError (a missing API key included) or PromptError."""
    llm = None
    if cfg.uses_llm:
        llm = LLMConfig.of(cfg)
    try:
        return make_critic(cfg.name, max_hint_tokens=cfg.max_hint_tokens, llm_config=llm, all_errors=cfg.all_errors,
                           max_errors=cfg.max_errors)
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
    rejects = open_rejects(cfg.rejects)  # its folder is created
    loaded = LoadSummary()
    try:
        trajectories = load_trajectories(cfg.inputs, rejects=rejects, summary=loaded)
    finally:
        if rejects:
            rejects.close()
    if warning := empty_warning(cfg.inputs, loaded):
        log.warning(warning)
    if cfg.limit is not None:
        trajectories = trajectories[:cfg.limit]
    summary, keys = critique(trajectories, cfg.critic, cfg.out, progress=cfg.progress)
    summary.rejected, summary.rejects_path = loaded.rejected, cfg.rejects  # the summary counts them too
    if cfg.datasets_out:  # this run's critiques, in input order
        latest = {r["key"]: r for r in read_latest(cfg.out)}
        write_records(cfg.datasets_out, [latest[k] for k in keys if k in latest], format="datasets")
    return summary


def critique_fn(cfg: CriticConfig, *, concurrency: int | None = None, progress: bool = True,
                echo: Callable[[str], None] = print) -> Callable[[list[Trajectory], Path], list[Critique]]:
    """A `CritiqueFn` (trajectories, out_path) -> one critique per trajectory, in order, resumable
    through out_path (eval, demo, loop). A fresh critic per call. Raises CritiqueRunError when the run
    failed as a whole (`RunSummary.error`) because of the server (transport failures) or an LLM critic that
    failed every reply; rule-critic failures on replies that cannot be critiqued are records, not errors."""
    if concurrency is not None:
        cfg = dataclasses.replace(cfg, concurrency=concurrency)

    def fn(trajs: list[Trajectory], out_path: Path) -> list[Critique]:
        summary, keys = critique(trajs, cfg, out_path, progress=progress)
        echo(format_summary(summary))
        # a reply no critique can describe (e.g. nothing generated to quote) is a `failed` row of the tables,
        # not a broken run; a server that keeps failing is (its records stay retryable)
        if summary.error and (summary.transport_failed or cfg.uses_llm):
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
