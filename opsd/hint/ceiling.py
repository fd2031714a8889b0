"""The hinted teacher's ceiling: what the model writes when it DECODES with the critic's hint in view.

    from opsd.hint.ceiling import run_ceiling
    report = run_ceiling(trajs, crits, rollout=RolloutConfig(model=M, ...), critique=critique_fn(cfg), out=DIR)
    opsd loop ...      # every round: OUT/round_K/ceiling/ceiling.json, a column of loop.md

Self-distillation cannot teach more than its teacher knows: the student is trained toward the
same model's distribution under the hint, so a hint the model cannot act on teaches nothing
("Decoding the Dynamics of On-Policy Distillation", 2026). Before training, this measures that
headroom on the very replies the round trains on:

1. each reply the critic marked `error` gives a hinted prompt: the messages above the erroneous
   step, then the hint as a user turn (`opsd.hint.build.hint_message_text`, the same text and
   place as the training teacher's), with the student's reply prefill;
2. the model decodes greedily from it (`opsd rollout` on those prompts as a task file), and the
   same critic checks the result (for BFCL tasks the official checker too);
3. hinted teacher and unhinted student are paired on the same tasks: official accuracy, replies
   the critic passes, and the same error category again, overall and per category of the hint.

Every erroneous reply is counted: a hinted reply that fails to parse, is cut off or was never
produced (a rollout failure) counts as not fixed. A reply the critic passed needs no hint: the
teacher there is the student, so its outcome is the student's own (`ceiling` on all tasks).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from opsd.critique.outcomes import reply_outcomes
from opsd.eval import stats
from opsd.eval.metrics import HEADLINE, no_reply_outcome, reply_outcome
from opsd.hint.build import hint_message_text
from opsd.io.records import write_records
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import load_rollouts
from opsd.rollout.run import main as rollout_main
from opsd.types import Critique, Trajectory

ACCURATE = HEADLINE["official_accuracy"][1]


def hinted_prompt(traj: Trajectory, crit: Critique) -> list[dict]:
    """The messages above the erroneous step, then the hint as a user turn (the training teacher's context)."""
    return [*traj.messages[:crit.step], {"role": "user", "content": hint_message_text(crit.hint)}]


def hinted_tasks(trajs: list[Trajectory], crits: list[Critique]) -> list[dict]:
    """One task line per task whose (first) reply the critic marked `error`, keyed by the original task id (the
    official checker reads it); trajectories without an `error` critique, or with a step that is not an
    assistant message, give none."""
    by_id = {c.trajectory_id: c for c in crits}
    out, seen = [], set()
    for t in trajs:
        c = by_id.get(t.id)
        tid = str(t.meta.get("task_id", t.id))
        if c is None or c.verdict != "error" or tid in seen or not isinstance(c.step, int) \
                or not 0 <= c.step < len(t.messages) or t.messages[c.step].get("role") != "assistant":
            continue
        seen.add(tid)
        meta = {k: v for k, v in t.meta.items() if k in ("category", "source")}
        out.append({"id": tid, "messages": hinted_prompt(t, c), "tools": t.tools,
                    "ground_truth": t.meta.get("ground_truth"),
                    "meta": meta | {"hinted_from": t.id, "hint_category": c.category}})
    return out


def _first_by_task(trajs: list[Trajectory], crits: list[Critique]) -> dict[str, tuple[Trajectory, Critique | None]]:
    by_id = {c.trajectory_id: c for c in crits}
    out: dict[str, tuple] = {}
    for t in trajs:
        out.setdefault(str(t.meta.get("task_id", t.id)), (t, by_id.get(t.id)))
    return out


def _fixed(o: dict, category: str | None) -> dict[str, bool]:
    """What a hinted reply achieved: official accuracy, the critic passes it, the hinted category is gone."""
    crit = o.get("critique") or {}
    errors = {e["category"] for e in o.get("errors") or []}
    passed = crit.get("verdict") == "ok" and not o.get("parse_error") and o.get("reply", True)
    return {"accurate": bool(ACCURATE(o)), "critic_ok": bool(passed),
            "category_gone": bool(o.get("reply", True)) and crit.get("verdict") in ("ok", "error")
            and crit.get("category") != category and category not in errors}


def measure_ceiling(trajs: list[Trajectory], crits: list[Critique], hinted: list[Trajectory],
                    hinted_crits: list[Critique], *, n_boot: int = stats.N_BOOT, seed: int = stats.SEED) -> dict:
    """Hinted teacher vs unhinted student, paired by task (see module docstring)."""
    student = _first_by_task(trajs, crits)
    teacher = _first_by_task(hinted, hinted_crits)
    rows = []
    for tid, (t, c) in student.items():
        s_out = reply_outcome(t, c, reply_outcomes)
        if c is None or c.verdict != "error":  # no hint: the teacher is the student
            rows.append({"task_id": tid, "hinted": False, "category": None, "student": s_out, "teacher": s_out})
            continue
        ht, hc = teacher.get(tid, (None, None))
        t_out = no_reply_outcome(f"{tid}#hinted") if ht is None else reply_outcome(ht, hc, reply_outcomes)
        rows.append({"task_id": tid, "trajectory_id": t.id, "hinted": True, "category": c.category,
                     "student": s_out, "teacher": t_out})
    kw = {"n_boot": n_boot, "seed": seed}
    hinted_rows = [r for r in rows if r["hinted"]]
    fixed = [_fixed(r["teacher"], r["category"]) for r in hinted_rows]
    by_cat: dict[str, list[dict]] = {}
    for r, f in zip(hinted_rows, fixed):
        by_cat.setdefault(r["category"] or "unknown", []).append(f)
    return {
        "n_tasks": len(rows), "n_hinted": len(hinted_rows),
        # all tasks: the student, and the teacher that answers with the hint where the critic found an error
        "accuracy_all": stats.paired_binary([ACCURATE(r["student"]) for r in rows],
                                            [ACCURATE(r["teacher"]) for r in rows], **kw),
        # the erroneous replies only: what the hint fixed when the model decodes with it
        "accuracy_hinted": stats.paired_binary([ACCURATE(r["student"]) for r in hinted_rows],
                                               [f["accurate"] for f in fixed], **kw),
        "critic_ok_hinted": stats.rate(sum(f["critic_ok"] for f in fixed), len(fixed)),
        "category_gone_hinted": stats.rate(sum(f["category_gone"] for f in fixed), len(fixed)),
        "no_parseable_call_hinted": stats.rate(sum(HEADLINE["no_parseable_call"][1](r["teacher"]) for r in hinted_rows),
                                               len(hinted_rows)),
        "by_category": {cat: {"n": len(fs), "accurate": stats.rate(sum(f["accurate"] for f in fs), len(fs)),
                              "critic_ok": stats.rate(sum(f["critic_ok"] for f in fs), len(fs)),
                              "category_gone": stats.rate(sum(f["category_gone"] for f in fs), len(fs))}
                        for cat, fs in sorted(by_cat.items(), key=lambda kv: -len(kv[1]))},
        # per erroneous reply: what its hinted decode achieved (`teacher_verified` reads it)
        "per_reply": [{"trajectory_id": r["trajectory_id"], "task_id": r["task_id"], "category": r["category"], **f,
                       "fixes": f["category_gone"] and not HEADLINE["no_parseable_call"][1](r["teacher"])}
                      for r, f in zip(hinted_rows, fixed)],
    }


TEACHER_CHECKS = {"fixes": "fixes", "correct": "accurate"}  # --train-on value -> per_reply key


def teacher_verified(report: dict, crits: list[Critique], how: str, path: Path) -> tuple[list[Critique], Path]:
    """The critiques to train on when only replies whose hinted teacher acted on the hint count (`--train-on`),
    written beside `path` as PATH-HOW.jsonl (a file of their own: the training key reads its content); returns
    them and that file. `fixes` keeps an error critique when the greedy hinted decode (`report["per_reply"]`) no
    longer makes the hinted error and still holds a parseable call, `correct` when it is officially correct. A reply
    without a hinted decode (another sample of the same task) is dropped: nothing says its teacher knows the fix.
    Other verdicts stay."""
    if how not in TEACHER_CHECKS:
        raise ValueError(f"train_on must be all, {' or '.join(TEACHER_CHECKS)}; got {how!r}")
    ok = {r["trajectory_id"] for r in report.get("per_reply", []) if r[TEACHER_CHECKS[how]]}
    kept = [c for c in crits if c.verdict != "error" or c.trajectory_id in ok]
    out = path.with_name(f"{path.stem}-{how}.jsonl")
    write_records(out, (c.to_dict() for c in kept))
    return kept, out


def run_ceiling(trajs: list[Trajectory], crits: list[Critique], *, rollout: RolloutConfig,
                critique: Callable[[list[Trajectory], Path], list[Critique]], out: Path,
                n_boot: int = stats.N_BOOT, seed: int = stats.SEED) -> dict:
    """Decode greedily with each hint in view (resumable, OUT/rollouts.jsonl), critique, and measure; writes
    OUT/ceiling.json. `rollout` gives the model, prefill, token budget and precision; tasks, out, limit,
    samples and temperature are set here."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = hinted_tasks(trajs, crits)
    hinted: list[Trajectory] = []
    hinted_crits: list[Critique] = []
    if tasks:
        write_records(out / "tasks.jsonl", tasks)
        rcfg = dataclasses.replace(rollout, tasks=str(out / "tasks.jsonl"), out=str(out / "rollouts.jsonl"),
                                   limit=None, samples=1, temperature=0.0)
        rollout_main(rcfg)
        hinted = load_rollouts(rcfg)
        hinted_crits = critique(hinted, out / "critiques.jsonl")
    report = measure_ceiling(trajs, crits, hinted, hinted_crits, n_boot=n_boot, seed=seed)
    (out / "ceiling.json").write_text(json.dumps(report, indent=2))
    return report


def format_ceiling(report: dict) -> str:
    """One line: hinted-teacher accuracy against the student's, on all tasks and on the hinted ones."""
    a, h = report["accuracy_all"], report["accuracy_hinted"]
    return (f"hinted teacher, decoding: accuracy {100 * a['after']['rate']:.1f}% vs student {100 * a['before']['rate']:.1f}%"
            f" (n={a['n']}); on the {report['n_hinted']} erroneous replies: correct {100 * h['after']['rate']:.1f}%, "
            f"critic passes {100 * report['critic_ok_hinted']['rate']:.1f}%, hinted error gone "
            f"{100 * report['category_gone_hinted']['rate']:.1f}%")
