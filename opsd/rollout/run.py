"""On-policy rollouts: sample student replies on tasks and write trajectories (resumable JSONL).

    opsd rollout --tasks bfcl:simple_python:train --limit 64 --out runs/r/rollouts.jsonl
    opsd rollout --tasks my_tasks.jsonl --backend openai --base-url http://localhost:8000/v1 \
        --api-model Qwen/Qwen2.5-7B-Instruct --concurrency 32 --out rollouts.jsonl

Backends:
- `hf` (default; opsd.rollout.hf): our own batched decode loop on transformers, at `--precision`
  (auto: bf16 where the CPU/GPU has bf16 units). Prompts are length-sorted and prefilled once per
  task (samples share the prompt KV); the KV cache is allocated once; each row stops at
  `</tool_call>` (single-call tasks) or end of turn and leaves the batch. The exact generated ids
  are recorded in the assistant message (`token_ids`), so later stages score exactly what the
  model produced.
- `openai` (opsd.rollout.client): any OpenAI-compatible server, chat completions, asyncio concurrency.
- `completions` (opsd.rollout.completions): token-exact, opsd's prompt ids to /v1/completions.

A reply prefill (default `<tool_call>\\n` for the embedded model, which makes no calls without it)
is forced at the start of every reply; the assistant message records it as `"prefill"` (a prefix
of `content` that the model did not choose, so critics never quote inside it).

Each output line is a trajectory whose last message is the student's reply, with `meta.task_id`,
`meta.ground_truth`, `meta.finish_reason` and `meta.parse_error` (unparsable replies are kept
with their raw text, never dropped). Lines are keyed by task, sample and config; a killed run
resumes where it stopped. Items whose generation raised go to OUT.errors.jsonl and are retried
on the next run.
"""
from __future__ import annotations

import logging
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from opsd.io.records import ResumableJsonl, read_jsonl, write_records
from opsd.io.tasks import load_tasks
from opsd.rollout import multi_turn
from opsd.rollout.client import run_chat
from opsd.rollout.completions import run_completions
from opsd.rollout.config import RolloutConfig, prefill_arg
from opsd.rollout.hf import DecodeStats, generate_batch, run_hf
from opsd.rollout.writer import Writer, make_trajectory, parse_calls
from opsd.types import Trajectory

log = logging.getLogger(__name__)


class RedactingWriter:
    """A text file whose every write goes through `redact` first (the error lines of every backend)."""

    def __init__(self, f, redact: Callable[[str], str]):
        self.f, self.redact = f, redact

    def write(self, text: str) -> int:
        return self.f.write(self.redact(text))

    def flush(self) -> None:
        self.f.flush()


@contextmanager
def redacting_errors(cfg: RolloutConfig) -> Iterator[None]:
    """An exception leaving the stage (a ServerError, an unreachable server) says what failed without a secret."""
    try:
        yield
    except Exception as e:
        if e.args and any(isinstance(a, str) and cfg.redact(a) != a for a in e.args):
            e.args = tuple(cfg.redact(a) if isinstance(a, str) else a for a in e.args)
        raise


def load_rollouts(cfg: RolloutConfig) -> list:
    """The trajectories `main(cfg)` wrote for exactly this config (the file may hold other runs')."""
    suffix = "@" + cfg.hash()
    return [Trajectory.from_dict(r) for r in read_jsonl(cfg.out) if r.get("key", "").endswith(suffix)]


def main(cfg: RolloutConfig) -> dict:
    """Run the rollout stage; returns a summary dict (also printed by the CLI)."""
    tasks = load_tasks(cfg.tasks, limit=cfg.limit)
    chash = cfg.hash()
    out = ResumableJsonl(cfg.out)
    todo = [(t, k, f"{t.id}#s{k}@{chash}") for t in tasks for k in range(cfg.samples)]
    todo = [x for x in todo if x[2] not in out]
    errors_path = Path(str(cfg.out) + ".errors.jsonl")
    t0 = time.time()
    decode: DecodeStats | None = None
    with open(errors_path, "w", encoding="utf-8") as error_file, \
            tqdm(total=len(todo), desc="rollout", unit="reply", disable=False, file=sys.stderr) as bar, \
            redacting_errors(cfg):
        errors = RedactingWriter(error_file, cfg.redact)  # every backend's error lines: no key, no URL credentials
        if todo:
            random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
            todo_single, todo_multi = multi_turn.split_todo(todo)  # multi-turn tasks: the agent loop
            if todo_multi:
                multi_turn.run(cfg, todo_multi, out, errors, bar)
            if todo_single and cfg.backend == "hf":
                decode = run_hf(cfg, todo_single, Writer(cfg, out, errors, bar, {"precision": cfg.resolved_precision()}))
            elif todo_single and cfg.backend == "completions":  # token-exact server rollouts
                run_completions(cfg, todo_single, out, errors, bar)
            elif todo_single:
                run_chat(cfg, todo_single, Writer(cfg, out, errors, bar))
    n_err = sum(1 for _ in open(errors_path, encoding="utf-8"))
    if not n_err:
        errors_path.unlink()
    mine = [r for r in out.done.values() if r["key"].endswith("@" + chash)]
    out.close()
    if cfg.datasets_out:
        write_records(cfg.datasets_out, mine, format="datasets")
    parse_fail = sum(1 for r in mine if r["meta"].get("parse_error"))
    summary = {"tasks": len(tasks), "samples": cfg.samples, "written_now": len(todo) - n_err,
               "total": len(mine), "errors": n_err, "parse_errors": parse_fail, "seconds": round(time.time() - t0, 1),
               "out": str(cfg.out)}
    if decode is not None:  # hf backend: prompt vs generated tokens/s
        summary["decode"] = decode.summary()
    return summary


__all__ = ["RolloutConfig", "Writer", "generate_batch", "load_rollouts", "main", "make_trajectory", "parse_calls",
           "prefill_arg"]
