"""Evaluation: did the errors go down on held-out tasks, measured so that it cannot flatter, and at what cost?

    opsd eval --before smollm2-135m-instruct --after runs/demo/model \
        --tasks bfcl:multiple,parallel_multiple:heldout --limit 128 --out runs/demo/report

Stages (each writes its artifacts under OUT; rollouts and critiques are resumable):
1. behaviour: fresh greedy rollouts of A (before) and B (after) on the same held-out tasks,
   critiqued by the injected critic. Per reply (`opsd.eval.metrics`): the function name it
   commits to (truncated calls included), the official BFCL AST checker's verdict next to the
   reference critic's, every error in it (schema + reference checks over the whole reply, from
   the injected `outcome_fn`), the critic's first error, the finish reason. All stored per task.
2. paired comparisons (`opsd.eval.stats`): every outcome and every table row, before vs after on
   the same tasks: difference with a bootstrap 95% CI over tasks, exact McNemar p, per category.
3. teacher-forced, on A's critiqued held-out errors: log-prob of the error span and of its first
   token under A, B and the hinted A (the OPSD teacher); fraction lowered; argmax flip rate at
   the first error token; hinted-teacher gap closed = (B - A) / (hinted - A).
4. collateral: per-token KL(A||B) and the log-prob change on the ground-truth call rendered as
   the reply (one per task, so n > 0 whenever tasks have ground truth), plus KL(A||B) on A's
   generated tokens outside error spans and on A's replies the critic passed.
   Stages 3 and 4 come from one grouped pass per model: every sequence that reads a task's prompt
   (reply, ground-truth call, hinted reply) is scored with the prompt run once (`opsd.train.shared_prefix`).
Outputs report.json (keys documented in README "Evaluation report"), report.md (verdicts first)
and PNG plots. `scripts/recompute_report.py` recomputes every headline rate from report.json.

This module never imports `opsd_critic`: the caller passes `critique_fn` (and `outcome_fn`).
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from opsd.eval import metrics, stats
from opsd.eval.config import EvalConfig
from opsd.eval.report import write_report
from opsd.eval.stats import rate, wilson  # noqa: F401  (re-exported: used by callers of opsd.eval.run)
from opsd.eval.targets import verdicts
from opsd.hint.build import build_examples
from opsd.io import models
from opsd.io.tasks import bfcl, load_tasks
from opsd.redact import redacted
from opsd.render import render
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import load_rollouts
from opsd.rollout.run import main as rollout_main
from opsd.train.diagnostics import summarise
from opsd.train.shared_prefix import Member, grouped_span_scores
from opsd.types import Critique, Trajectory

REPORT_VERSION = 2
CritiqueFn = Callable[[list[Trajectory], Path], list[Critique]]


# ----------------------------------------------------------------------------- teacher-forced + drift
def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _score_items(trajs, critiques, examples, tok, prefill_len: int, *, all_turns: bool = False,
                 group_of: Callable[[Trajectory], str] | None = None) -> list[dict]:
    """One scoring item per critiqued trajectory of A: its scored tokens (`gen`: the last reply's generated
    tokens, or with `all_turns` every assistant message's tokens) plus the error span; `task` groups the
    items whose prompt is scored once (meta.task_id, or `group_of`)."""
    by_id = {c.trajectory_id: c for c in critiques}
    ex_by_id = {e.meta["trajectory_id"]: e for e in examples}
    items = []
    for t in trajs:
        c = by_id.get(t.id)
        if c is None or c.verdict == "failed":
            continue
        ex = ex_by_id.get(t.id) if c.verdict == "error" else None
        if c.verdict == "error" and ex is None:
            continue  # not buildable: counted in build_counts
        r = render(t, tok)
        if all_turns:  # every assistant message of a log: all of it was "generated" as far as we know
            gen = [r.body_spans[i] for i, m in enumerate(t.messages) if m.get("role") == "assistant"]
        else:
            bs, be = r.body_spans[len(t.messages) - 1]
            gen = [(min(bs + prefill_len, be), be)]  # generated tokens only: the prefill was forced
        gen = [(g0, g1) for g0, g1 in gen if g1 > g0]
        bounds = [g for g in gen] + ([tuple(ex.student_span)] if ex is not None else [])
        if not bounds:
            continue
        lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
        items.append({"ids": r.input_ids, "span": (lo, hi), "gen": gen, "example": ex,
                      "task": group_of(t) if group_of else t.meta.get("task_id", t.id), "trajectory_id": t.id})
    return items


def _kl_per_token(rows: list[tuple[float, int]], cfg: EvalConfig) -> dict:
    """{"mean", "n_tokens", "n", "ci95"}: KL per token over the trajectories' tokens, CI resampling trajectories."""
    r = stats.ratio_of_sums([k for k, _ in rows], [n for _, n in rows], n_boot=cfg.bootstrap, seed=cfg.seed)
    return {"mean": r["mean"], "n_tokens": int(r["n_units"]), "n": r["n"], "ci95": r["ci95"]}


def teacher_forced_all(model_a, model_b, tok, trajs: list[Trajectory], critiques: list[Critique], cfg: EvalConfig,
                       prefill_ids: list[int] | tuple = (), *, gt_calls: bool = True, all_turns: bool = False,
                       group_of: Callable[[Trajectory], str] | None = None,
                       progress: bool = True) -> tuple[dict, dict, dict]:
    """Error-span metrics, KL(A||B) drift and the ground-truth-call collateral, from ONE grouped pass per model.

    Per task, every sequence that reads its prompt is scored in one group (`opsd.train.shared_prefix`:
    the prompt runs once): under A, the reply (full log-prob rows over its generated tokens and error
    span), the ground-truth call (rows) and the hinted reply (the OPSD teacher: the error tokens'
    log-probs); under B, the same sequences. From them: the error tokens' log-probs
    under A, B and hinted A, the argmax at the first error token, the per-token KL(A||B) outside error
    spans and on clean replies, and per task the KL and log-probs on the ground-truth call.
    A progress bar counts the groups (tasks) on stderr unless `progress` is off.
    `all_turns` scores every assistant message for the drift (logs: `opsd.eval.logs`), not only the last
    reply's generated tokens; `group_of` says which trajectories share a prompt (default: meta.task_id).
    Drift is per token over the trajectories (`stats.ratio_of_sums`, CI over trajectories).
    Returns (teacher_forced, drift, {task id: ground-truth-call sums}).
    """
    examples, counts = build_examples(trajs, critiques, tok, placement=cfg.placement, span=cfg.span)
    items = _score_items(trajs, critiques, examples, tok, len(prefill_ids), all_turns=all_turns, group_of=group_of)
    groups: dict[str, dict] = {}
    for it in items:
        groups.setdefault(it["task"], {"items": [], "gt": None})["items"].append(it)
    for tid, ids, span in _gt_items(trajs, tok, prefill_ids) if gt_calls else []:
        groups.setdefault(tid, {"items": [], "gt": None})["gt"] = (ids, span)
    # A scores the reply, the ground-truth call and the hinted reply (the OPSD teacher); B the first two only
    # (about a fifth fewer tokens). The same model object on both sides is scored once: identical numbers.
    scored_b, scored = [], []
    for g in groups.values():
        own = [Member(it["ids"], it["span"], rows=True) for it in g["items"]]
        own += [Member(*g["gt"], rows=True)] if g["gt"] else []
        scored_b.append(own)
        scored.append(own + [Member(it["example"].teacher_ids, tuple(it["example"].teacher_span))
                             for it in g["items"] if it["example"] is not None])
    pad = tok.pad_token_id or 0
    kl: dict[str, list[tuple[float, int]]] = {"err": [], "clean": []}  # per trajectory: (KL sum, tokens)
    per, gt_per = [], {}
    scores_a = grouped_span_scores(model_a, scored, batch_size=cfg.score_batch_size, pad_id=pad)
    if model_b is model_a:
        scores_a, scores_b = itertools.tee(scores_a)  # consumed in lockstep: one group buffered
    else:
        scores_b = grouped_span_scores(model_b, scored_b, batch_size=cfg.score_batch_size, pad_id=pad)
    bar = tqdm(zip(groups.items(), zip(scores_a, scores_b)), total=len(groups), desc="teacher-forced",
               unit="task", disable=not progress, file=sys.stderr)
    for (tid, g), (sa, sb) in bar:
        n = len(g["items"])
        hinted = iter(sa[n + (g["gt"] is not None):])
        for it, la, lb in zip(g["items"], sa, sb):
            lo, _ = it["span"]
            kl_L = (la.exp() * (la - lb)).sum(-1).clamp(min=0)  # (L,) KL(A||B) = sum_v pA (log pA - log pB)
            keep = torch.zeros(len(kl_L), dtype=torch.bool)
            for g0, g1 in it["gen"]:
                keep[g0 - lo:g1 - lo] = True
            ex = it["example"]
            if ex is not None:
                s0, s1 = ex.student_span
                keep[s0 - lo:s1 - lo] = False
                tgt = torch.tensor(ex.student_ids[s0:s1])
                a_lp = la[s0 - lo:s1 - lo].gather(-1, tgt[:, None])[:, 0]  # (S,)
                b_lp = lb[s0 - lo:s1 - lo].gather(-1, tgt[:, None])[:, 0]
                h_lp = next(hinted)
                per.append({"trajectory_id": ex.meta["trajectory_id"], "category": ex.meta.get("category"),
                            "step": ex.meta.get("step"), "span_tokens": s1 - s0,
                            "before": a_lp.mean().item(), "after": b_lp.mean().item(),
                            "hinted": h_lp.mean().item(), "first_before": a_lp[0].item(),
                            "first_after": b_lp[0].item(), "first_hinted": h_lp[0].item(),
                            "argmax_before_is_error": int(la[s0 - lo].argmax()) == int(tgt[0]),
                            "argmax_after_is_error": int(lb[s0 - lo].argmax()) == int(tgt[0])})
            kl["err" if ex is not None else "clean"].append((kl_L[keep].sum().item(), int(keep.sum())))
        if g["gt"] is not None:
            ids, (s0, s1) = g["gt"]
            la, lb = sa[n], sb[n]
            tgt = torch.tensor(ids[s0:s1])[:, None]  # (L, 1)
            kl_L = (la.exp() * (la - lb)).sum(-1).clamp(min=0)  # (L,) KL(A||B) per token
            gt_per[tid] = {"n_tokens": s1 - s0, "kl_sum": kl_L.sum().item(),
                           "logprob_before": la.gather(-1, tgt).sum().item(),
                           "logprob_after": lb.gather(-1, tgt).sum().item()}
    drift = {name: _kl_per_token(kl[key], cfg) for name, key in (("kl_outside_error_spans", "err"),
                                                                ("kl_critic_ok_replies", "clean"))}
    res = {"n_examples": len(per), "build_counts": dict(counts)}
    if not per:
        return res, drift, gt_per
    mb, ma, mh = _mean(p["before"] for p in per), _mean(p["after"] for p in per), _mean(p["hinted"] for p in per)
    greedy = [p for p in per if p["argmax_before_is_error"]]
    ft = {k: _mean(p[f"first_{k}"] for p in per) for k in ("before", "after", "hinted")}
    res.update({
        "error_span_logprob": {"before": mb, "after": ma, "hinted": mh, "delta": ma - mb},
        "error_span_paired": stats.paired_mean([p["before"] for p in per], [p["after"] for p in per],
                                               n_boot=cfg.bootstrap, seed=cfg.seed),
        "lowered": rate(sum(p["after"] < p["before"] for p in per), len(per)),
        "first_token_logprob": ft | {"delta": ft["after"] - ft["before"]},
        "fraction_lowered": _mean(float(p["after"] < p["before"]) for p in per),
        "argmax_flip_rate": _mean(float(not p["argmax_after_is_error"]) for p in greedy) if greedy else None,
        "argmax_flip_base": len(greedy),
        "hint_effect": mh - mb,
        "gap_closed": (ma - mb) / (mh - mb) if abs(mh - mb) > 1e-9 else None,
        "per_example": per,
    })
    return res, drift, gt_per


def first_acceptable(value):
    """One concrete value from a BFCL possible answer: nested dicts map each key to a list of acceptable values
    (the first non-omittable one is taken; a key whose first value is "" is omitted); lists are kept, with
    their dict items resolved the same way."""
    if isinstance(value, dict):
        return {k: first_acceptable(vals[0]) for k, vals in value.items()
                if isinstance(vals, list) and vals and vals[0] != ""}
    if isinstance(value, list):
        return [first_acceptable(v) for v in value]
    return value


def gt_call(ground_truth: list[dict]) -> list[dict]:
    """A correct call list from BFCL possible answers (first acceptable value; optional params omitted)."""
    calls = []
    for k, call in enumerate(ground_truth):
        (name, params), = call.items()
        args = {p: first_acceptable(vals[0]) for p, vals in params.items() if vals and vals[0] != ""}
        calls.append({"id": f"gt_{k}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls


def _gt_items(trajs: list[Trajectory], tok, prefill_ids) -> list[tuple[str, list[int], tuple[int, int]]]:
    """(task id, ids, span) per task with ground truth: its first correct call rendered as the reply; a forced
    prefill at the reply's start is not in the span."""
    prefill_ids = list(prefill_ids)
    out, seen = [], set()
    for t in trajs:
        gt = t.meta.get("ground_truth")
        tid = t.meta.get("task_id", t.id)
        if not gt or tid in seen:
            continue
        seen.add(tid)
        ref = Trajectory(tid, t.messages[:-1] + [{"role": "assistant", "content": None, "tool_calls": gt_call(gt)}],
                         t.tools)
        r = render(ref, tok)
        bs, be = r.body_spans[-1]
        skip = len(prefill_ids) if prefill_ids and r.input_ids[bs:bs + len(prefill_ids)] == prefill_ids else 0
        if be - bs - skip > 0:
            out.append((tid, r.input_ids, (bs + skip, be)))
    return out


def gt_call_collateral(model_a, model_b, tok, trajs: list[Trajectory], cfg: EvalConfig,
                       prefill_ids: list[int] | tuple = ()) -> tuple[dict, dict]:
    """KL(A||B) and log-probs on the ground-truth call rendered as the assistant reply (the clean trajectory).

    One item per task with ground truth. Returns ({task id: {"n_tokens", "kl_sum", "logprob_before",
    "logprob_after"}} (sums over the call's tokens; a forced prefill at its start is not scored), summary):
    `kl_per_token` (token-weighted, bootstrap CI over tasks) and `logprob_per_token` (per-task mean
    log-prob per token under A and B, paired).
    """
    _, _, per = teacher_forced_all(model_a, model_b, tok, trajs, [], cfg, prefill_ids)
    return per, summarise_gt_call(per, cfg.bootstrap, cfg.seed)


def summarise_gt_call(per: dict[str, dict], n_boot: int = stats.N_BOOT, seed: int = stats.SEED) -> dict:
    """The summary of `gt_call_collateral`'s per-task sums (also used by scripts/recompute_report.py)."""
    vals = list(per.values())
    return {"n": len(vals), "n_tokens": sum(v["n_tokens"] for v in vals),
            "kl_per_token": stats.ratio_of_sums([v["kl_sum"] for v in vals], [v["n_tokens"] for v in vals],
                                                n_boot=n_boot, seed=seed),
            "logprob_per_token": stats.paired_mean([v["logprob_before"] / v["n_tokens"] for v in vals],
                                                   [v["logprob_after"] / v["n_tokens"] for v in vals],
                                                   n_boot=n_boot, seed=seed)}


# ----------------------------------------------------------------------------- orchestration
def _rollouts(model: str, name: str, cfg: EvalConfig, prefill: str) -> list[Trajectory]:
    path = Path(cfg.out) / f"rollouts_{name}.jsonl"
    rcfg = RolloutConfig(tasks=cfg.tasks, out=str(path), model=model, limit=cfg.limit, prefill=prefill,
                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=cfg.device,
                         precision=cfg.precision)
    rollout_main(rcfg)
    return load_rollouts(rcfg)


def behaviour(cfg: EvalConfig, tasks, trajs_a, trajs_b, crit_a, crit_b,
              outcome_fn: metrics.OutcomeFn | None = None) -> tuple[list[dict], dict]:
    """Per-task outcomes of both models and their paired comparison (no model needed)."""
    per_task = metrics.per_task_outcomes(tasks, trajs_a, trajs_b, crit_a, crit_b, outcome_fn)
    return per_task, metrics.compare(per_task, n_boot=cfg.bootstrap, seed=cfg.seed)


def _data_summary(cfg: EvalConfig, tasks) -> dict:
    cats: dict[str, int] = {}
    for t in tasks:
        c = t.meta.get("category", "tasks")
        cats[c] = cats.get(c, 0) + 1
    out = {"n_tasks": len(tasks), "by_category": cats,
           "mean_tools_per_task": sum(len(t.tools) for t in tasks) / len(tasks) if tasks else 0.0}
    if cfg.tasks.startswith("bfcl:"):
        out["bfcl_splits"] = bfcl.split_report()
    return out


def main(cfg: EvalConfig, critique_fn: CritiqueFn, *, outcome_fn: metrics.OutcomeFn | None = None,
         log=print) -> dict:
    """Run the evaluation; returns the report (also written to cfg.out). `outcome_fn` lists every error of a
    reply (`opsd.critique.outcomes.reply_outcomes`); without it the error tables say `not_checked`."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prefill = cfg.prefill if cfg.prefill is not None else RolloutConfig(model=cfg.before).resolved_prefill()
    tasks = load_tasks(cfg.tasks, limit=cfg.limit)
    wall: dict[str, float] = {}  # seconds per stage of this call (a resumed stage counts what it redid)
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        wall[name] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()

    log(f"[eval 1/5] rollouts of before={cfg.before} and after={cfg.after} on {cfg.tasks} ({len(tasks)} tasks)")
    trajs_a = _rollouts(cfg.before, "before", cfg, prefill)
    lap("rollouts_before")
    trajs_b = _rollouts(cfg.after, "after", cfg, prefill)
    lap("rollouts_after")
    log("[eval 2/5] critiques")
    crit_a = critique_fn(trajs_a, out / "critiques_before.jsonl")
    crit_b = critique_fn(trajs_b, out / "critiques_after.jsonl")
    lap("critiques")
    log("[eval 3/5] per-reply outcomes (names, official checker, every error) and paired comparisons")
    per_task, comparison = behaviour(cfg, tasks, trajs_a, trajs_b, crit_a, crit_b, outcome_fn)
    report: dict = {"version": REPORT_VERSION, "config": redacted(asdict(cfg) | {"prefill": prefill}),
                    "data": _data_summary(cfg, tasks), "comparison": comparison}
    log("[eval 4/5] teacher-forced error-span metrics and collateral on ground-truth calls")
    model_a, tok = models.load(cfg.before, device=cfg.device, precision=cfg.precision)
    model_b, _ = models.load(cfg.after, device=cfg.device, precision=cfg.precision)
    prefill_ids = tok(prefill, add_special_tokens=False)["input_ids"] if prefill else []
    with torch.no_grad():
        report["teacher_forced"], drift, gt_per = teacher_forced_all(model_a, model_b, tok, trajs_a, crit_a, cfg,
                                                                     prefill_ids)
    lap("teacher_forced")
    gt_per = {t["task_id"]: gt_per[t["task_id"]] for t in per_task if t["task_id"] in gt_per}  # task order
    gt_summary = summarise_gt_call(gt_per, cfg.bootstrap, cfg.seed)  # what scripts/recompute_report.py redoes
    before_ok = [t["before"] for t in per_task]
    report["collateral"] = drift | {"gt_call": gt_summary, "base_fully_correct": {
        "official": rate(sum(o["rows"]["official"] == "valid" for o in before_ok), len(before_ok)),
        "reference": rate(sum(o.get("reference") == "ok" for o in before_ok), len(before_ok)),
        "critic": rate(sum(o["rows"]["critic"] == "ok" for o in before_ok), len(before_ok))}}
    for t in per_task:
        t["gt_call"] = gt_per.get(t["task_id"])
    report["per_task"] = per_task
    if cfg.train_run and (Path(cfg.train_run) / "metrics.jsonl").exists():
        report["training_metrics"] = str(Path(cfg.train_run) / "metrics.jsonl")
        report["training_diagnostics"] = summarise(Path(cfg.train_run) / "metrics.jsonl")
    report["verdicts"] = verdicts(report)
    report["wall_s"] = wall
    log("[eval 5/5] writing report")
    write_report(report, out)
    return report
