"""Resumable critique run: every trajectory critiqued exactly once into an append-only JSONL.

    summary = run_critiques(trajectories, critic, "critiques.jsonl", concurrency=8)
    print(format_summary(summary))

Each output line is `Critique.to_dict()` plus `"key": f"{trajectory_hash}:{config_hash}"`.
Lines are appended one at a time and fsynced (`opsd.io.records.ResumableJsonl`); a rerun skips
keys already present, and a torn last line from a killed run is cut off, so kill + rerun
yields every trajectory exactly once. Identical trajectories (same messages and tools) share
one key, hence one record. Every critique is validated (`critic.validate.check_critique`)
before it is written; a critic that raises is recorded as `failed` with the exception. Only
`CriticFatalError` (bad key/model/URL) stops the run.

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

from critic.base import CriticFatalError
from critic.validate import check_critique, failed
from opsd.io.records import ResumableJsonl
from opsd.types import Critique, Trajectory

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """Counts for one run: `verdicts`/`categories`/`usage` over all records of the input."""

    total: int = 0  # distinct trajectories (by key) in the input
    skipped: int = 0  # already in the output before this run
    new: int = 0  # written by this run
    verdicts: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)  # error categories
    failures: Counter = field(default_factory=Counter)  # failed reasons (first 80 chars)
    usage: Counter = field(default_factory=Counter)  # summed token usage of this run


def record_key(traj: Trajectory, critic) -> str:
    return f"{traj.content_hash()}:{critic.info['config_hash']}"


async def _critique_one(critic, traj: Trajectory) -> Critique:
    try:
        c = await critic.critique(traj)
    except CriticFatalError:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a critic bug on one trajectory must not stop the run
        log.debug("critic raised on %s", traj.id, exc_info=True)
        c = failed(traj, critic.info, f"critic raised {type(e).__name__}: {e}")
    c.critic = critic.info
    c.trajectory_id = traj.id
    c.trajectory_hash = traj.content_hash()
    return check_critique(c, traj, max_hint_tokens=critic.max_hint_tokens)


async def run_critiques_async(trajectories: Iterable[Trajectory], critic, out_path: str | Path, *,
                              concurrency: int = 8, progress: bool = True) -> RunSummary:
    """Critique every trajectory not yet in `out_path` (see module docstring)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    summary = RunSummary()
    with ResumableJsonl(out_path, key_field="key") as out:
        if out.repaired_bytes:
            log.warning("%s: removed a torn last line (%d bytes) left by an interrupted run", out_path, out.repaired_bytes)
        keys: dict[str, Trajectory] = {}
        for t in trajectories:
            keys.setdefault(record_key(t, critic), t)
        todo = [(k, t) for k, t in keys.items() if k not in out]
        summary.total, summary.skipped = len(keys), len(keys) - len(todo)
        sem = asyncio.Semaphore(concurrency)

        async def one(key: str, traj: Trajectory):
            async with sem:
                return key, await _critique_one(critic, traj)

        bar = tqdm(total=len(todo), desc=f"critique[{critic.info['name']}]", unit="traj", disable=not progress,
                   dynamic_ncols=True)
        n_failed = 0
        tasks = [asyncio.ensure_future(one(k, t)) for k, t in todo]
        try:
            for fut in asyncio.as_completed(tasks):
                key, c = await fut
                await asyncio.to_thread(out.append, {**c.to_dict(), "key": key})  # fsync off the event loop
                summary.new += 1
                n_failed += c.verdict == "failed"
                for k, v in (c.usage or {}).items():
                    if isinstance(v, (int, float)):
                        summary.usage[k] += v
                bar.update(1)
                bar.set_postfix(failed=n_failed, tokens=summary.usage.get("total_tokens", 0), refresh=False)
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
    return summary


def run_critiques(trajectories: Iterable[Trajectory], critic, out_path: str | Path, *, concurrency: int = 8,
                  progress: bool = True) -> RunSummary:
    """Synchronous wrapper of `run_critiques_async`."""
    return asyncio.run(run_critiques_async(trajectories, critic, out_path, concurrency=concurrency, progress=progress))


def format_summary(s: RunSummary) -> str:
    """Human-readable summary: counts per verdict and per error category, top failure reasons."""
    lines = [f"{s.total} trajectories: {s.new} critiqued now, {s.skipped} already done"]
    lines.append("verdict   " + "  ".join(f"{v} {s.verdicts.get(v, 0)}" for v in ("error", "ok", "failed")))
    if s.categories:
        lines.append("category  " + "  ".join(f"{c} {n}" for c, n in s.categories.most_common()))
    for reason, n in s.failures.most_common(5):
        lines.append(f"failed    {n} x {reason}")
    if s.usage:
        lines.append("usage     " + "  ".join(f"{k} {v}" for k, v in sorted(s.usage.items())))
    return "\n".join(lines)
