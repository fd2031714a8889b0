"""Where every rollout backend puts its results: a raw reply becomes a trajectory line (its calls parsed, the
forced prefill marked, the task's ground truth and the config's hash in meta), a failure a line of OUT.errors.jsonl.

    writer = Writer(cfg, ResumableJsonl(cfg.out), errors_file, tqdm_bar)
    writer.reply(task, sample, key, content, token_ids=ids, finish="stop")
"""
from __future__ import annotations

import json

from opsd.types import Task
from opsd.io.trajectories import parse_tool_call_text
from opsd.rollout.config import RolloutConfig


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
