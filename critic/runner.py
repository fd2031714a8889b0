"""Resumable critique run: every trajectory critiqued exactly once into an append-only JSONL.

    summary = run_critiques(trajectories, critic, "critiques.jsonl", concurrency=8)
    print(format_summary(summary))

Each output line is `Critique.to_dict()` plus `"key": record_key(traj, critic)` (and, for an
LLM critic, `"replies"`: every raw reply with its round and `finish_reason`, redacted) where key =
`"<trajectory id>:<hash of messages, tools and meta>:<critic config hash>"`: one record per
input trajectory (identical content under two ids gets two records), and any change to what
the critic reads (a fixed `meta.ground_truth` included) or to the critic invalidates it.
Lines are appended one at a time and fsynced (`opsd.io.records.ResumableJsonl`); a rerun skips
keys already present, and a torn last line from a killed run is cut off, so kill + rerun
yields every trajectory exactly once. Every critique is validated
(`opsd_critic.validate.check_critique`) before it is written; a critic that raises is recorded as
`failed` with the exception. Only `CriticFatalError` (bad key/model/URL) stops the run.

A transport failure that survived the critic's retries is recorded `failed` with
`retryable: true`; a rerun retries it (`retry_failed="transport"`, the default; `"none"`
keeps every failure, `"all"` also retries bad replies) and appends the new record under the
same key, which supersedes the old one (`read_critiques` and `ResumableJsonl` keep the last
record of a key). Before the first request the critic's `preflight(traj)` (if any) runs
once on a real trajectory, so a broken prompt template stops the run with its file and line.

The progress bar (stderr) shows done / failed / tokens; the summary counts verdicts and
categories over all records of the given trajectories (earlier runs included).
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from opsd_critic.base import CriticFatalError
from opsd_critic.redact import redacting_logs
from opsd_critic.validate import check_critique
from opsd.io.records import ResumableJsonl, read_latest
from opsd.types import Critique, Trajectory, content_hash

log = logging.getLogger(__name__)

RETRY_FAILED = ("transport", "none", "all")


@dataclass
class RunSummary:
    """Counts for one run: `verdicts`/`categories`/`usage` over all records of the input."""

    total: int = 0  # input trajectories (one key each)
    skipped: int = 0  # already in the output before this run
    new: int = 0  # written by this run
    retried: int = 0  # of `new`: failed records of an earlier run that this run retried
    failed_now: int = 0  # of `new`: failed
    transport_failed: int = 0  # of `new`: failed on transport errors (retryable)
    verdicts: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)  # error categories
    failures: Counter = field(default_factory=Counter)  # failed reasons (first 80 chars)
    usage: Counter = field(default_factory=Counter)  # summed token usage of this run
    error: str | None = None  # why the run as a whole failed (`run_problem`); None = it did not
    rejected: int = 0  # invalid input records skipped before the run (`--rejects`), set by the caller
    rejects_path: str | None = None  # where they were written; None = no --rejects


def critic_input_hash(traj: Trajectory) -> str:
    """Hash of everything a critic reads: messages, tools and meta (ground truth, task, prefill)."""
    return content_hash({"messages": traj.messages, "tools": traj.tools, "meta": traj.meta})


def record_key(traj: Trajectory, critic) -> str:
    return f"{traj.id}:{critic_input_hash(traj)}:{critic.info['config_hash']}"


def needs_run(record: dict | None, retry_failed: str = "transport") -> bool:
    """Whether a trajectory whose last record is `record` (None: none yet) is critiqued (again)."""
    if record is None:
        return True
    if record.get("verdict") != "failed" or retry_failed == "none":
        return False
    return retry_failed == "all" or bool(record.get("retryable"))


def run_problem(s: RunSummary, max_transport_failure_share: float) -> str | None:
    """Why the run must end non-zero, or None: every critique of this run failed, or more than
    `max_transport_failure_share` of them failed on transport errors."""
    if s.new == 0:
        return None
    top = s.failures.most_common(1)[0][0] if s.failures else ""
    if s.failed_now == s.new:
        return f"every critique of this run failed ({s.new} of {s.new}), e.g.: {top}"
    if s.transport_failed / s.new > max_transport_failure_share:
        return (f"{s.transport_failed} of {s.new} critiques failed on transport errors (more than the allowed share "
                f"{max_transport_failure_share:g}); they are recorded as retryable: fix the server and rerun")
    return None


def read_critiques(path: str | Path) -> dict[str, Critique]:
    """{key: critique} of a critique file, the LAST record of each key (a retry supersedes a failure)."""
    return {r["key"]: Critique.from_dict(r) for r in read_latest(path)}


async def _critique_one(critic, traj: Trajectory) -> tuple[Critique, list[dict] | None]:
    """The validated critique of `traj` and the critic's raw replies (`c.replies` of an LLM critic; else None)."""
    try:
        c = await critic.critique(traj)
    except CriticFatalError:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a critic bug on one trajectory must not stop the run
        log.debug("critic raised on %s", traj.id, exc_info=True)
        c = Critique(traj.id, "failed", error=f"critic raised {type(e).__name__}: {e}")  # the rest is set below
    c.critic = critic.info
    c.trajectory_id = traj.id
    c.trajectory_hash = traj.content_hash()
    return check_critique(c, traj, max_hint_tokens=critic.max_hint_tokens), getattr(c, "replies", None)


async def run_critiques_async(trajectories: Iterable[Trajectory], critic, out_path: str | Path, *,
                              concurrency: int = 8, progress: bool = True, retry_failed: str = "transport",
                              max_transport_failure_share: float = 1.0) -> RunSummary:
    """Critique every trajectory not yet done in `out_path` (see module docstring).

    `summary.error` says why the run as a whole failed (`run_problem`); the caller decides the
    exit code. Raises `CriticFatalError` (bad key/model/URL) and the critic's `PromptError`.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if retry_failed not in RETRY_FAILED:
        raise ValueError(f"retry_failed must be one of {', '.join(RETRY_FAILED)}, got {retry_failed!r}")
    summary = RunSummary()
    secrets = getattr(critic, "secrets", lambda: [])()
    with redacting_logs(secrets), ResumableJsonl(out_path, key_field="key") as out:
        if out.repaired_bytes:
            log.warning("%s: removed a torn last line (%d bytes) left by an interrupted run", out_path, out.repaired_bytes)
        keys: dict[str, Trajectory] = {}
        for t in trajectories:
            keys.setdefault(record_key(t, critic), t)
        todo = [(k, t) for k, t in keys.items() if needs_run(out.done.get(k), retry_failed)]
        summary.total, summary.skipped = len(keys), len(keys) - len(todo)
        retry = {k for k, _ in todo if k in out.done}
        preflight = getattr(critic, "preflight", None)
        if todo and preflight is not None:
            try:
                preflight(todo[0][1])  # a broken prompt template fails here, before any request
            except BaseException:
                await critic.aclose()
                raise
        sem = asyncio.Semaphore(concurrency)

        async def one(key: str, traj: Trajectory):
            async with sem:
                return key, *await _critique_one(critic, traj)

        bar = tqdm(total=len(todo), desc=f"critique[{critic.info['name']}]", unit="traj", disable=not progress,
                   dynamic_ncols=True)
        tasks = [asyncio.ensure_future(one(k, t)) for k, t in todo]
        try:
            for fut in asyncio.as_completed(tasks):
                key, c, replies = await fut
                out.done.pop(key, None)  # a retry supersedes the failed record (the file keeps both; last wins)
                rec = {**c.to_dict(), "key": key} | ({"replies": replies} if replies is not None else {})
                await asyncio.to_thread(out.append, rec)  # fsync off the event loop
                summary.new += 1
                summary.retried += key in retry
                summary.failed_now += c.verdict == "failed"
                summary.transport_failed += c.verdict == "failed" and c.retryable
                for k, v in (c.usage or {}).items():
                    if isinstance(v, (int, float)):
                        summary.usage[k] += v
                bar.update(1)
                bar.set_postfix(failed=summary.failed_now, tokens=summary.usage.get("total_tokens", 0), refresh=False)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            bar.close()
            await critic.aclose()
        for k in keys:
            rec = out.done.get(k)
            if rec is None:
                continue
            summary.verdicts[rec["verdict"]] += 1
            if rec["verdict"] == "error":
                summary.categories[rec.get("category") or "?"] += 1
            elif rec["verdict"] == "failed":
                summary.failures[str(rec.get("error"))[:80]] += 1
    summary.error = run_problem(summary, max_transport_failure_share)
    return summary


def run_critiques(trajectories: Iterable[Trajectory], critic, out_path: str | Path, *, concurrency: int = 8,
                  progress: bool = True, retry_failed: str = "transport",
                  max_transport_failure_share: float = 1.0) -> RunSummary:
    """Synchronous wrapper of `run_critiques_async`."""
    return asyncio.run(run_critiques_async(trajectories, critic, out_path, concurrency=concurrency, progress=progress,
                                           retry_failed=retry_failed,
                                           max_transport_failure_share=max_transport_failure_share))


def format_summary(s: RunSummary) -> str:
    """Human-readable summary: counts per verdict and per error category, top failure reasons."""
    lines = [f"{s.total} trajectories: {s.new} critiqued now, {s.skipped} already done"
             + (f" ({s.retried} failed before and retried)" if s.retried else "")]
    if s.rejects_path is not None:
        lines.append(f"rejected  {s.rejected} invalid input record(s)"
                     + (f", not critiqued; each with its reason in {s.rejects_path}" if s.rejected else ""))
    lines.append("verdict   " + "  ".join(f"{v} {s.verdicts.get(v, 0)}" for v in ("error", "ok", "failed")))
    if s.categories:
        lines.append("category  " + "  ".join(f"{c} {n}" for c, n in s.categories.most_common()))
    for reason, n in s.failures.most_common(5):
        lines.append(f"failed    {n} x {reason}")
    if s.transport_failed:
        lines.append(f"retryable {s.transport_failed} transport failures this run: rerun to retry them")
    if s.usage:
        lines.append("usage     " + "  ".join(f"{k} {v}" for k, v in sorted(s.usage.items())))
    return "\n".join(lines)
