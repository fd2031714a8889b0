"""The off-policy cold start of `opsd loop` / `opsd demo`: supervised steps on ground-truth calls, before round 1.

    opsd demo --cold-start-steps 20 --cold-start-lr 3e-5        # the demo's default
    opsd loop --cold-start-steps 0                               # off: round 1 starts from the base student

On-policy distillation only works where the teacher brings something the student lacks ("Decoding the
Dynamics of On-Policy Distillation", 2026; "Rethinking OPD": off-policy cold start). A hinted teacher that
is the student itself cannot write a correct call the student has never seen the shape of: the base
SmolLM2-135M answers BFCL tasks by echoing the schema (RESULTS.md §1), so its hinted teacher fixes the
function name but not the arguments. A few SFT steps on the ground-truth calls of the TRAIN split teach the
shape; the on-policy rounds then train on the errors the cold-started student still makes.

1. the tasks of `cold_start_tasks` (default: the rounds' own train split) that carry ground truth become
   trajectories whose reply is the ground-truth call (`gt_trajectories`; first acceptable value of each
   parameter, optional ones left out);
2. `opsd train --mode sft` runs `cold_start_steps` optimizer steps on them (OUT/cold_start/train/), cached
   like every round's training: a rerun reuses the model only when its config and input bytes are the same.
The cold-started model is scored on the validation split as round 0 and competes with the rounds for
"best round" (a model no round beats is kept).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from opsd.eval.run import gt_call
from opsd.io.tasks import Task, load_tasks
from opsd.io.records import write_records
from opsd.train.config import TrainConfig
from opsd.types import Trajectory


def gt_trajectories(tasks: list[Task]) -> list[Trajectory]:
    """One trajectory per task with ground truth: its prompt, and the ground-truth call as the reply."""
    out = []
    for t in tasks:
        if not t.ground_truth or not all(isinstance(c, dict) for c in t.ground_truth):
            continue  # no single-turn ground truth (BFCL multi-turn ground truth is per turn, not one call list)
        reply = {"role": "assistant", "content": None, "tool_calls": gt_call(t.ground_truth)}
        out.append(Trajectory(f"{t.id}#gt", [*t.messages, reply], t.tools, {**t.meta, "task_id": t.id}))
    return out


# options of the rounds' distillation that SFT never reads: the cold start takes them at the loop's defaults, so that
# changing them (--train.anchor, --train.loss, ...) keeps the cold start's training key and reuses it, not retrains it
SFT_UNREAD = ("placement", "span", "anchor", "inline_open", "inline_close", "min_hint_effect", "teacher", "teacher_model",
              "ema_decay", "precompute_targets", "top_k", "loss", "beta", "seq_kd", "teacher_system", "gen_temperature",
              "gen_prefill", "reward", "samples_per_prompt", "select_overlap", "select_mix", "diag_top_k",
              "teacher_reuses_prefix")
_UNREAD_AT = TrainConfig(mode="opsd", teacher="initial", precompute_targets=True)  # the loop's own train defaults


def cold_start_config(train: TrainConfig, *, model: str, data: str, out: Path, steps: int, lr: float) -> TrainConfig:
    """The SFT run of the cold start: the loop's train settings (batch, precision, LoRA, seed), mode sft; the
    distillation-only options (`SFT_UNREAD`) at the loop's defaults."""
    return dataclasses.replace(train, model=model, mode="sft", trajectories=data, critiques="", out=str(out),
                               lr=lr, max_steps=steps, warmup_steps=min(train.warmup_steps, steps), resume=True,
                               cold_start_sft=0, select_prompts=False, lmbda=0.0, rl_alpha=1.0,
                               **{k: getattr(_UNREAD_AT, k) for k in SFT_UNREAD})


def cold_start(spec: str, train: TrainConfig, *, model: str, out: Path, steps: int, lr: float,
               trained: Callable[[TrainConfig, Path], str], echo: Callable[[str], None] = print) -> dict:
    """Run (or reuse) the cold start; returns {"model", "tasks", "examples", "steps", "lr"}."""
    tasks = load_tasks(spec)
    trajs = gt_trajectories(tasks)
    if not trajs:
        raise ValueError(f"cold_start_tasks: {spec!r} has no task with ground truth to learn from")
    write_records(out / "gt.jsonl", (t.to_dict() for t in trajs))
    data = str(out / "gt.jsonl")
    tcfg = cold_start_config(train, model=model, data=data, out=out / "train", steps=steps, lr=lr)
    echo(f"[loop cold start] {steps} SFT steps at lr {lr:g} on the ground-truth calls of {len(trajs)} tasks of {spec}")
    trained_model = trained(tcfg, out / "train" / "done.json")
    return {"model": trained_model, "tasks": spec, "examples": len(trajs), "steps": steps, "lr": lr}
