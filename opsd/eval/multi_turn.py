"""Evaluation on held-out BFCL multi-turn tasks, scored by BFCL's official multi-turn checker.

    from opsd.eval.multi_turn import main
    report = main(EvalConfig(before=A, after=B, tasks="bfcl:multi_turn_base:heldout", limit=8, out=OUT), critique_fn)

1. fresh rollouts of A (before) and B (after) on the same tasks, with the agent loop of
   `opsd.rollout.multi_turn` (same caps for both);
2. per episode: BFCL's verdict (`multi_turn_checker` itself, via
   `opsd.io.tasks.bfcl_multi_turn.official_check`) and its error type, the finish reason, the
   replies and turns played;
3. the injected critic's critiques (e.g. `reference`): where the FIRST error sits: reply k of the
   n replies of the episode (1-based), in which turn (1-based), its category;
4. paired comparisons over every task (`opsd.eval.stats`): accuracy (exact McNemar, bootstrap CI),
   the critic's error rate, episodes that failed, replies per episode. An episode whose rollout
   failed (`no_episode`) is a failure in each outcome, as a missing reply is in the single-turn
   evaluation; a missing or failed critique counts as "critic finds an error";
5. teacher-forced, on A's critiqued errors (hints right above the erroneous reply, the span only):
   the error span's mean log-prob under A, B and the hinted A, the fraction lowered, gap closed.

Writes OUT/report.json (`version`, `config`, `n_tasks`, `accuracy`, `critic_error`, `episode_failed`, `steps`,
`first_error_position` (before/after), `finish_reasons`, `official_error_types`,
`teacher_forced`, `per_task`) and OUT/report.md. This module never imports `opsd_critic`.
"""
from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from opsd.eval import stats
from opsd.eval.config import EvalConfig
from opsd.hint.build import build_examples
from opsd.io import models
from opsd.io.tasks import bfcl_multi_turn as mt
from opsd.io.tasks import load_tasks
from opsd.redact import redacted
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import load_rollouts
from opsd.rollout.run import main as rollout_main
from opsd.train.scoring import span_logprobs
from opsd.types import Critique, Trajectory

REPORT_VERSION = 1
CritiqueFn = Callable[[list[Trajectory], Path], list[Critique]]


def is_multi_turn_spec(spec: str) -> bool:
    """Whether a task spec names BFCL multi-turn categories (`bfcl:multi_turn_...`)."""
    parts = spec.split(":")
    return len(parts) >= 2 and parts[0] == "bfcl" and any(c.startswith("multi_turn_") for c in parts[1].split(","))


def first_error_position(traj: Trajectory, c: Critique | None) -> dict | None:
    """Where a critique's erroneous step sits: reply `step` of `of` replies (1-based), in `turn` of `turns`."""
    if c is None or c.verdict != "error" or c.step is None:
        return None
    replies = [i for i, m in enumerate(traj.messages) if m.get("role") == "assistant"]
    if c.step not in replies:
        return None
    starts = mt.turn_starts(traj.messages, traj.meta)
    turn = sum(1 for s in starts if s <= c.step)
    return {"step": replies.index(c.step) + 1, "of": len(replies), "turn": turn, "turns": len(starts),
            "category": c.category, "message": c.step}


def episode_outcome(traj: Trajectory, c: Critique | None) -> dict:
    """One episode's outcome: BFCL's verdict, the finish, the replies, the critic's first error."""
    official = mt.official_check(traj.messages, traj.meta)
    info = traj.meta.get("multi_turn") or {}
    return {"valid": bool(official["valid"]), "official_error": official.get("error_type"),
            "finish_reason": traj.meta.get("finish_reason"),
            "steps": sum(1 for m in traj.messages if m.get("role") == "assistant"),
            "turns_played": info.get("turns_played"), "turns": len(info.get("ground_truth") or []),
            "critic": c.verdict if c is not None else "missing", "first_error": first_error_position(traj, c),
            "episode": True}


NO_EPISODE = "no_episode"


def no_episode_outcome() -> dict:
    """The outcome of a task whose episode is missing (its rollout failed): a failure in every outcome."""
    return {"valid": False, "official_error": NO_EPISODE, "finish_reason": None, "steps": None, "turns_played": 0,
            "turns": None, "critic": NO_EPISODE, "first_error": None, "episode": False}


def paired_episodes(task_ids: list[str], before: list[Trajectory], crits_before: list[Critique],
                    after: list[Trajectory], crits_after: list[Critique]) -> list[dict]:
    """One entry per task id, in order: {"task_id", "before", "after"}; a missing episode is `no_episode_outcome`."""
    sides = {}
    for k, trajs, crits in (("before", before, crits_before), ("after", after, crits_after)):
        by_id = {c.trajectory_id: c for c in crits}
        sides[k] = {}
        for t in trajs:
            sides[k].setdefault(t.meta["task_id"], episode_outcome(t, by_id.get(t.id)))
    return [{"task_id": tid, **{k: sides[k].get(tid) or no_episode_outcome() for k in sides}} for tid in task_ids]


def critic_error(o: dict) -> bool:
    """The critic found an error, or gave no verdict (failed or missing critique, no episode)."""
    return o["critic"] != "ok"


def compare_episodes(per_task: list[dict], **kw) -> dict:
    """Paired outcomes over every task: accuracy, the critic's error rate and failed episodes; the replies per
    episode over the tasks whose two episodes both finished (its n says how many)."""
    ob, oa = [p["before"] for p in per_task], [p["after"] for p in per_task]
    both = [(b, a) for b, a in zip(ob, oa) if b["episode"] and a["episode"]]
    return {"accuracy": stats.paired_binary([o["valid"] for o in ob], [o["valid"] for o in oa], **kw),
            "critic_error": stats.paired_binary([critic_error(o) for o in ob], [critic_error(o) for o in oa], **kw),
            "episode_failed": stats.paired_binary([not o["episode"] for o in ob], [not o["episode"] for o in oa], **kw),
            "steps": stats.paired_mean([b["steps"] for b, _ in both], [a["steps"] for _, a in both], **kw)}


def position_summary(outcomes: list[dict]) -> dict:
    """The distribution of the first error's position over episodes with one."""
    pos = [o["first_error"] for o in outcomes if o["first_error"]]
    if not pos:
        return {"n": 0}
    rel = [(p["step"] - 1) / max(p["of"] - 1, 1) for p in pos]
    return {"n": len(pos),
            "step": dict(sorted(Counter(p["step"] for p in pos).items())),
            "step_of": dict(sorted(Counter(f"{p['step']}/{p['of']}" for p in pos).items(),
                                   key=lambda kv: tuple(map(int, kv[0].split("/"))))),
            "turn": dict(sorted(Counter(p["turn"] for p in pos).items())),
            "category": dict(Counter(p["category"] for p in pos).most_common()),
            "median_step": statistics.median(p["step"] for p in pos),
            "median_replies": statistics.median(p["of"] for p in pos),
            "first_reply_share": sum(p["step"] == 1 for p in pos) / len(pos),
            "mean_relative_position": sum(rel) / len(rel)}


def _rollouts(model: str, name: str, cfg: EvalConfig, prefill: str | None, max_steps_per_turn: int | None):
    kw = {"max_steps_per_turn": max_steps_per_turn} if max_steps_per_turn else {}
    rcfg = RolloutConfig(tasks=cfg.tasks, out=str(Path(cfg.out) / f"rollouts_{name}.jsonl"), model=model,
                         limit=cfg.limit, prefill=prefill, max_new_tokens=cfg.max_new_tokens, device=cfg.device, **kw)
    rollout_main(rcfg)
    return load_rollouts(rcfg)


def teacher_forced(model_a, model_b, tok, trajs: list[Trajectory], crits: list[Critique], cfg: EvalConfig) -> dict:
    """Error-span log-probs of A's critiqued errors under A, B and the hinted A (the OPSD teacher)."""
    examples, counts = build_examples(trajs, crits, tok, placement=cfg.placement, span=cfg.span)
    out: dict = {"n_examples": len(examples), "build_counts": dict(counts)}
    if not examples:
        return out
    pad, b = tok.pad_token_id or 0, cfg.score_batch_size
    sids, sspans = [e.student_ids for e in examples], [tuple(e.student_span) for e in examples]
    la = span_logprobs(model_a, sids, sspans, batch_size=b, pad_id=pad).token_logprobs
    lb = span_logprobs(model_b, sids, sspans, batch_size=b, pad_id=pad).token_logprobs
    lh = span_logprobs(model_a, [e.teacher_ids for e in examples], [tuple(e.teacher_span) for e in examples],
                       batch_size=b, pad_id=pad).token_logprobs
    before, after, hinted = ([float(x.mean()) for x in v] for v in (la, lb, lh))
    mb, ma, mh = (sum(v) / len(v) for v in (before, after, hinted))
    out.update({"error_span_logprob": {"before": mb, "after": ma, "hinted": mh, "delta": ma - mb},
                "paired": stats.paired_mean(before, after, n_boot=cfg.bootstrap, seed=cfg.seed),
                "lowered": stats.rate(sum(x < y for x, y in zip(after, before)), len(before)),
                "gap_closed": (ma - mb) / (mh - mb) if abs(mh - mb) > 1e-9 else None,
                "per_example": [{"trajectory_id": e.meta["trajectory_id"], "step": e.meta["step"],
                                 "category": e.meta["category"], "before": x, "after": y, "hinted": z}
                                for e, x, y, z in zip(examples, before, after, hinted)]})
    return out


def main(cfg: EvalConfig, critique_fn: CritiqueFn, *, max_steps_per_turn: int | None = None, log=print) -> dict:
    """Run the multi-turn evaluation; returns the report (also written to cfg.out)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prefill = cfg.prefill if cfg.prefill is not None else RolloutConfig(model=cfg.before).resolved_prefill()
    tasks = load_tasks(cfg.tasks, limit=cfg.limit)
    if not all(mt.is_multi_turn(t.meta) for t in tasks):
        raise ValueError(f"tasks: {cfg.tasks!r} mixes single-turn and multi-turn tasks; evaluate them separately")
    log(f"[eval 1/4] multi-turn rollouts of before={cfg.before} and after={cfg.after} on {cfg.tasks} ({len(tasks)} tasks)")
    trajs = {"before": _rollouts(cfg.before, "before", cfg, prefill, max_steps_per_turn),
             "after": _rollouts(cfg.after, "after", cfg, prefill, max_steps_per_turn)}
    log("[eval 2/4] critiques")
    crits = {k: critique_fn(v, out / f"critiques_{k}.jsonl") for k, v in trajs.items()}
    log("[eval 3/4] BFCL's multi-turn checker, first-error positions, paired comparisons")
    per_task = paired_episodes([t.id for t in tasks], trajs["before"], crits["before"], trajs["after"], crits["after"])
    ob, oa = [p["before"] for p in per_task], [p["after"] for p in per_task]
    kw = {"n_boot": cfg.bootstrap, "seed": cfg.seed}
    report: dict = {
        "version": REPORT_VERSION,
        "config": redacted(asdict(cfg) | {"prefill": prefill, "max_steps_per_turn": max_steps_per_turn}),
        "n_tasks": len(tasks), "n_paired": len(per_task), **compare_episodes(per_task, **kw),
        "first_error_position": {"before": position_summary(ob), "after": position_summary(oa)},
        "finish_reasons": {k: dict(Counter(o["finish_reason"] for o in v)) for k, v in (("before", ob), ("after", oa))},
        "official_error_types": {k: dict(Counter(o["official_error"] for o in v if not o["valid"]))
                                 for k, v in (("before", ob), ("after", oa))},
        "critic_verdicts": {k: dict(Counter(o["critic"] for o in v)) for k, v in (("before", ob), ("after", oa))},
    }
    log("[eval 4/4] teacher-forced error-span metrics on the base model's critiqued errors")
    dtype = torch.bfloat16 if models.resolve_precision(cfg.precision, cfg.device) == "bf16" else torch.float32
    model_a, tok = models.load(cfg.before, device=cfg.device, dtype=dtype)
    model_b, _ = models.load(cfg.after, device=cfg.device, dtype=dtype)
    with torch.no_grad():
        report["teacher_forced"] = teacher_forced(model_a, model_b, tok, trajs["before"], crits["before"], cfg)
    report["per_task"] = per_task
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    return report


def _pct(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({r['count']}/{r['n']})"


def markdown(report: dict) -> str:
    """The report as Markdown: BFCL accuracy, the critic's error rate, where first errors sit, teacher-forced."""
    acc, crit = report["accuracy"], report["critic_error"]
    lines = [f"# Multi-turn evaluation ({report['config']['tasks']}, n={report['n_paired']})", "",
             "Every task counts: an episode whose rollout failed is a failure in each outcome.", "",
             "| metric (held-out) | before | after | diff [95% CI] | p |", "|---|---|---|---|---|"]
    rows = [("BFCL multi-turn accuracy (official checker)", acc),
            ("critic finds an error (or gave no verdict)", crit)]
    if report.get("episode_failed"):
        rows.append(("episode failed (no result)", report["episode_failed"]))
    for name, r in rows:
        ci = "n/a" if r["ci95"] is None else f"{r['diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
        pval = "n/a" if r["p"] is None else f"{r['p']:.3g}"
        lines.append(f"| {name} | {_pct(r['before'])} | {_pct(r['after'])} | {ci} | {pval} |")
    s = report["steps"]
    if s["n"]:
        lines.append(f"| replies per episode (mean, n={s['n']} tasks both finished) | {s['before']:.2f} | {s['after']:.2f} | {s['diff']:+.2f} | "
                     f"{s['p']:.3g} |")
    lines += ["", "## Where the first error sits (reply k of n, 1-based)", ""]
    for k in ("before", "after"):
        p = report["first_error_position"][k]
        if not p["n"]:
            lines.append(f"- {k}: no episode with an error")
            continue
        lines.append(f"- {k}: n={p['n']}; reply k: {p['step']}; k/n: {p['step_of']}; turn: {p['turn']}; "
                     f"median k {p['median_step']} of median n {p['median_replies']}; first reply "
                     f"{100 * p['first_reply_share']:.0f}%; categories {p['category']}")
    lines += ["", f"Finish reasons: {report['finish_reasons']}", "",
              f"BFCL error types: {report['official_error_types']}", ""]
    tf = report.get("teacher_forced") or {}
    if tf.get("n_examples"):
        e = tf["error_span_logprob"]
        gap = "n/a" if tf["gap_closed"] is None else f"{tf['gap_closed']:.2f}"
        lines += ["## Teacher-forced on the base model's errors", "",
                  (f"n={tf['n_examples']}: mean error-span log-prob before {e['before']:.3f}, after {e['after']:.3f}, "
                   f"hinted teacher {e['hinted']:.3f}; lowered in {_pct(tf['lowered'])}; gap closed {gap}"), ""]
    return "\n".join(lines)
