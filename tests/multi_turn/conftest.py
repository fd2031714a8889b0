"""Helpers for multi-turn tests: scripted episodes (no model) built from BFCL's ground truth."""
from __future__ import annotations

import json

from opsd.io.tasks import Task, load_tasks
from opsd.io.tasks import bfcl_multi_turn as mt
from opsd.rollout.multi_turn import EpisodeLimits, Reply, play
from opsd.types import Trajectory

PREFILL = "<tool_call>\n"


def task(bfcl_id: str) -> Task:
    cat = mt.category_of(bfcl_id)
    return next(t for t in load_tasks(f"bfcl:{cat}:all") if t.id == bfcl_id)


def call_text(name: str, args: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def gt_turns(t: Task) -> list[list[tuple[str, dict]]]:
    """The ground-truth calls of every turn as (name, arguments)."""
    env = mt.environment(mt.entry(t.id))
    return [[env.parse_call(s) for s in turn] for turn in t.meta["multi_turn"]["ground_truth"]]


def script(turns: list[list[str]]) -> list[str]:
    """Replies in order: each turn's replies, then a text reply that ends the turn."""
    return [r for turn in turns for r in turn + ["Done."]]


def gt_script(t: Task) -> list[list[str]]:
    return [[call_text(n, a) for n, a in turn] for turn in gt_turns(t)]


def play_script(t: Task, replies: list[str], *, prefill: str = "", max_steps_per_turn: int = 10,
                token_ids: bool = True) -> Trajectory:
    """Play `replies` in order as the model's replies. With `token_ids`, each reply carries (fake) ids, so its
    content is kept verbatim like a real rollout's; the reply starts with the prefill when one is forced."""
    it = iter(replies)

    def reply(req):
        text = next(it)
        if req.prefill and not text.startswith(req.prefill):
            text = req.prefill + text
        return Reply(text, list(range(len(text))) if token_ids else None, "stop")

    msgs, extra = play(t, reply, EpisodeLimits(max_steps_per_turn=max_steps_per_turn), prefill=prefill)
    meta = {**t.meta, "finish_reason": extra["finish_reason"], "multi_turn": {**t.meta["multi_turn"], **extra["multi_turn"]}}
    return Trajectory(f"{t.id}#s0", msgs, t.tools, meta)
