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

import json
import logging
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from opsd.io.records import ResumableJsonl, write_records
from opsd.io.tasks import Task, load_tasks
from opsd.io.trajectories import parse_tool_call_text
from opsd.rollout import multi_turn
from opsd.rollout.client import run_chat
from opsd.rollout.config import RolloutConfig, prefill_arg
from opsd.rollout.hf import DecodeStats, generate_batch, run_hf

log = logging.getLogger(__name__)


def parse_calls(text: str) -> tuple[list[dict], str | None]:
    """Tool calls in a raw reply, and a parse error (None when every call parsed)."""
    _, calls, errors = parse_tool_call_text(text)
    opened = text.count("<tool_call>")
    if errors:
        return calls, "; ".join(errors)
    if opened > len(calls):
        return calls, "unterminated <tool_call> block (reply cut off)"
    if not calls:
        return calls, "no tool call in reply"
    return calls, None


def make_trajectory(task: Task, sample: int, content: str, *, token_ids: list[int] | None, finish: str,
                    cfg: RolloutConfig, key: str, tool_calls: list[dict] | None = None, meta: dict | None = None) -> dict:
    calls, err = parse_calls(content)
    if tool_calls:  # native calls from an OpenAI-compatible server
        calls, err = tool_calls, None
    msg: dict = {"role": "assistant", "content": content}
    prefill = cfg.resolved_prefill()
    if prefill and content.startswith(prefill):
        msg["prefill"] = prefill  # forced by us, not chosen by the model
    if calls:
        msg["tool_calls"] = calls
    if token_ids is not None:
        msg["token_ids"] = token_ids
    meta = {"task_id": task.id, "sample": sample, "model": str(cfg.model), "backend": cfg.backend,
            "finish_reason": finish, "parse_error": err, "rollout_config": cfg.hash(), **(meta or {}), **task.meta,
            **cfg.extra_meta}
    if task.ground_truth is not None:
        meta["ground_truth"] = task.ground_truth
    return {"id": f"{task.id}#s{sample}", "key": key, "messages": task.messages + [msg], "tools": task.tools,
            "meta": meta}


class Writer:
    """Where the backends put their results: a reply becomes a trajectory line, a failure a line of
    OUT.errors.jsonl (retried by the next run); both advance the progress bar."""

    def __init__(self, cfg: RolloutConfig, out, errors, bar, meta: dict | None = None):
        self.cfg, self.out, self.errors, self.bar, self.meta = cfg, out, errors, bar, meta or {}

    def reply(self, task: Task, sample: int, key: str, content: str, *, token_ids: list[int] | None, finish: str,
              tool_calls: list[dict] | None = None) -> None:
        self.out.append(make_trajectory(task, sample, content, token_ids=token_ids, finish=finish, cfg=self.cfg,
                                        key=key, tool_calls=tool_calls, meta=self.meta))
        self.bar.update(1)

    def error(self, task: Task, sample: int, key: str, error: str) -> None:
        self.errors.write(json.dumps({"key": key, "task_id": task.id, "sample": sample, "error": error}) + "\n")
        self.errors.flush()
        self.bar.update(1)


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
    from opsd.io.records import read_jsonl
    from opsd.types import Trajectory

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
                from opsd.rollout.completions import run_completions

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
