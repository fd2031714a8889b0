"""Task sources for rollouts: BFCL categories from the installed `bfcl-eval` data, or a user file.

    from opsd.io.tasks import load_tasks
    tasks = load_tasks("bfcl:simple_python:train")      # BFCL v4, leak-free split (train/validation/heldout)
    tasks = load_tasks("bfcl:multiple,live_multiple:heldout", limit=128)  # stratified sample per category
    tasks = load_tasks("my_tasks.jsonl")                 # {"id"?, "messages", "tools", "ground_truth"?}

A task is the prompt (messages + tools) a student is rolled out on, plus optional ground truth
in BFCL's possible-answer format: [{"fn_name": {"param": [acceptable values...]}}].
"""
from __future__ import annotations

import json
from pathlib import Path

from opsd.io.tasks import bfcl, bfcl_multi_turn
from opsd.io.trajectories import TrajectoryError, normalise
from opsd.types import Task, content_hash


def load_tasks(spec: str, *, limit: int | None = None) -> list[Task]:
    """Tasks for `spec`: `bfcl:CAT[,CAT...][:train|:validation|:heldout|:all]` or a JSONL path.

    `limit` on a BFCL spec takes a deterministic sample stratified by category (`bfcl.stratified`); on a
    task file, the first `limit` tasks in file order.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if spec.startswith("bfcl:"):
        return load_spec(spec, limit=limit)
    tasks = load_task_file(spec)
    return tasks[:limit] if limit else tasks


def load_spec(spec: str, limit: int | None = None) -> list[Task]:
    """`bfcl:CAT[,CAT...][:train|:validation|:heldout|:all]` -> tasks (categories in the order given): single-turn
    categories from `bfcl`, multi-turn ones (`multi_turn_*`, ...) from `bfcl_multi_turn`.

    With `limit`, a deterministic stratified sample (see `bfcl.stratified`), never the first N of the concatenation.
    """
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "bfcl" or not parts[1]:
        raise ValueError(f"bad task spec {spec!r}; expected bfcl:CATEGORY[,CATEGORY...][:{'|:'.join(bfcl.SPLITS)}]")
    split = parts[2] if len(parts) == 3 else "all"
    cats = parts[1].split(",")
    if len(set(cats)) != len(cats):
        raise ValueError(f"bad task spec {spec!r}: a category is listed twice")
    per_category = [(bfcl_multi_turn if bfcl_multi_turn.owns(cat) else bfcl).load(cat, split) for cat in cats]
    if limit is None:
        return [t for ts in per_category for t in ts]
    return bfcl.stratified(per_category, limit)


def load_task_file(path: str | Path) -> list[Task]:
    """User tasks: JSONL of {"id"?, "messages", "tools"?, "ground_truth"?, "meta"?}."""
    tasks, seen = [], set()
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrajectoryError(str(path), lineno, "$", f"valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
                raise TrajectoryError(str(path), lineno, "$", "an object with a 'messages' list")
            gt = obj.get("ground_truth")
            if gt is not None and not (isinstance(gt, list) and all(isinstance(c, dict) and len(c) == 1 for c in gt)):
                raise TrajectoryError(str(path), lineno, "$.ground_truth",
                                      'a list of {"fn_name": {"param": [acceptable values]}} objects')
            tid = str(obj.get("id") or "task-" + content_hash(obj["messages"])[:12])
            traj, _ = normalise({"id": tid, "messages": obj["messages"], "tools": obj.get("tools") or []},
                                file=str(path), line=lineno)
            if tid in seen:
                raise TrajectoryError(str(path), lineno, "$.id", f"a unique id; {tid!r} repeats")
            seen.add(tid)
            tasks.append(Task(tid, traj.messages, traj.tools, gt, obj.get("meta") or {}))
    return tasks
