"""Evaluation: how much were the errors down-weighted, and at what collateral cost?

    opsd eval --before smollm2-135m-instruct --after runs/demo/model \
        --tasks bfcl:simple_python,multiple:heldout --limit 64 --out runs/demo/report

Stages (each writes its artifacts under OUT, rollouts and critiques are resumable):
1. behaviour: fresh greedy rollouts of A (before) and B (after) on held-out tasks, critiqued
   (schema+reference by default); per-category error rates and accuracy with 95% Wilson
   intervals, plus the no-parseable-call rate read from the rollouts themselves.
2. teacher-forced, on A's critiqued held-out errors: log-prob of the error span and of its first
   token under A, B and the hinted A (the OPSD teacher); fraction lowered; argmax flip rate at
   the first error token; hinted-teacher gap closed = (B - A) / (hinted - A).
3. collateral: per-token KL(A||B) on A's generated tokens outside error spans and on clean
   trajectories; change in log-prob of the ground-truth correct call.
Outputs report.json (keys documented in README "Evaluation report"), report.md and PNG plots.

This module never imports `critic`: the caller passes `critique_fn`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from opsd.eval.config import EvalConfig
from opsd.types import Critique, Trajectory

REPORT_VERSION = 1
CritiqueFn = Callable[[list[Trajectory], Path], list[Critique]]


# ----------------------------------------------------------------------------- statistics
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n (0, 0 for n = 0)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"count": k, "n": n, "rate": k / n if n else 0.0, "ci95": [lo, hi]}


def behaviour_stats(trajs: list[Trajectory], critiques: list[Critique]) -> dict:
    """Per-category error rates, accuracy and no-parseable-call rate for one model's rollouts."""
    by_id = {c.trajectory_id: c for c in critiques}
    n = len(trajs)
    cats: dict[str, int] = {}
    ok = failed = 0
    for t in trajs:
        c = by_id.get(t.id)
        if c is None or c.verdict == "failed":
            failed += 1
        elif c.verdict == "ok":
            ok += 1
        else:
            cats[c.category or "unknown"] = cats.get(c.category or "unknown", 0) + 1
    no_call = sum(1 for t in trajs if t.meta.get("parse_error"))
    return {"n": n, "accuracy": rate(ok, n), "no_parseable_call": rate(no_call, n), "critique_failed": failed,
            "categories": {k: rate(v, n) for k, v in sorted(cats.items())}}


# ----------------------------------------------------------------------------- teacher-forced + drift
def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _rows(model, ids_list, spans, batch: int, pad: int):
    """(L, V) log-prob rows over each span, computed `batch` sequences at a time (rows never all in memory)."""
    from opsd.train.scoring import span_logprobs

    for k in range(0, len(ids_list), batch):
        yield from span_logprobs(model, ids_list[k:k + batch], spans[k:k + batch], batch_size=batch,
                                 return_rows=True, pad_id=pad).rows


def _score_items(trajs, critiques, examples, tok, prefill_len: int) -> list[dict]:
    """One scoring item per critiqued trajectory of A: its generated tokens (plus the error span)."""
    from opsd.render import render

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
        last = len(t.messages) - 1
        bs, be = r.body_spans[last]
        gs = min(bs + prefill_len, be)  # generated tokens only: the prefill was forced
        lo, hi = gs, be
        if ex is not None:
            lo, hi = min(lo, ex.student_span[0]), max(hi, ex.student_span[1])
        if hi <= lo:
            continue
        items.append({"ids": r.input_ids, "span": (lo, hi), "gen": (gs, be), "example": ex})
    return items


def teacher_forced_and_drift(model_a, model_b, tok, trajs: list[Trajectory], critiques: list[Critique],
                             cfg: EvalConfig, prefill_len: int = 0) -> tuple[dict, dict]:
    """Error-span metrics on A's critiqued errors, and KL(A||B) drift, from ONE pass per model per trajectory.

    Each pass returns full log-prob rows over the trajectory's generated tokens (and its error
    span), from which come: the error tokens' log-probs under A and B, the argmax at the first
    error token, and the per-token KL(A||B) outside error spans and on clean trajectories. The
    hinted teacher (A with the hint) is one more pass over the hinted sequences.
    """
    from opsd.hint.build import build_examples
    from opsd.train.scoring import span_logprobs

    examples, counts = build_examples(trajs, critiques, tok, placement=cfg.placement, span=cfg.span)
    items = _score_items(trajs, critiques, examples, tok, prefill_len)
    pad = tok.pad_token_id or 0
    b = cfg.score_batch_size
    ids, spans = [it["ids"] for it in items], [it["span"] for it in items]
    kl = {"err": [0.0, 0], "clean": [0.0, 0]}
    per = []
    for it, la, lb in zip(items, _rows(model_a, ids, spans, b, pad), _rows(model_b, ids, spans, b, pad)):
        lo, _ = it["span"]
        kl_L = (la.exp() * (la - lb)).sum(-1).clamp(min=0)  # (L,) KL(A||B) = sum_v pA (log pA - log pB)
        keep = torch.zeros(len(kl_L), dtype=torch.bool)
        keep[it["gen"][0] - lo:it["gen"][1] - lo] = True
        ex = it["example"]
        if ex is not None:
            s0, s1 = ex.student_span
            keep[s0 - lo:s1 - lo] = False
            tgt = torch.tensor(ex.student_ids[s0:s1])
            a_lp = la[s0 - lo:s1 - lo].gather(-1, tgt[:, None])[:, 0]  # (S,)
            b_lp = lb[s0 - lo:s1 - lo].gather(-1, tgt[:, None])[:, 0]
            per.append({"trajectory_id": ex.meta["trajectory_id"], "category": ex.meta.get("category"),
                        "span_tokens": s1 - s0, "before": a_lp.mean().item(), "after": b_lp.mean().item(),
                        "first_before": a_lp[0].item(), "first_after": b_lp[0].item(),
                        "argmax_before_is_error": int(la[s0 - lo].argmax()) == int(tgt[0]),
                        "argmax_after_is_error": int(lb[s0 - lo].argmax()) == int(tgt[0])})
        bucket = kl["err" if ex is not None else "clean"]
        bucket[0] += kl_L[keep].sum().item()
        bucket[1] += int(keep.sum())
    drift = {"kl_outside_error_spans": {"mean": kl["err"][0] / kl["err"][1] if kl["err"][1] else float("nan"),
                                        "n_tokens": kl["err"][1]},
             "kl_clean_trajectories": {"mean": kl["clean"][0] / kl["clean"][1] if kl["clean"][1] else float("nan"),
                                       "n_tokens": kl["clean"][1]}}
    res = {"n_examples": len(per), "build_counts": dict(counts)}
    if not per:
        return res, drift
    scored = [it["example"] for it in items if it["example"] is not None]
    h = span_logprobs(model_a, [e.teacher_ids for e in scored], [tuple(e.teacher_span) for e in scored],
                      batch_size=b, pad_id=pad).token_logprobs
    for p, h_lp in zip(per, h):
        p["hinted"], p["first_hinted"] = h_lp.mean().item(), h_lp[0].item()
    mb, ma, mh = _mean(p["before"] for p in per), _mean(p["after"] for p in per), _mean(p["hinted"] for p in per)
    greedy = [p for p in per if p["argmax_before_is_error"]]
    ft = {k: _mean(p[f"first_{k}"] for p in per) for k in ("before", "after", "hinted")}
    res.update({
        "error_span_logprob": {"before": mb, "after": ma, "hinted": mh, "delta": ma - mb},
        "first_token_logprob": ft | {"delta": ft["after"] - ft["before"]},
        "fraction_lowered": _mean(float(p["after"] < p["before"]) for p in per),
        "argmax_flip_rate": _mean(float(not p["argmax_after_is_error"]) for p in greedy) if greedy else None,
        "argmax_flip_base": len(greedy),
        "hint_effect": mh - mb,
        "gap_closed": (ma - mb) / (mh - mb) if abs(mh - mb) > 1e-9 else None,
        "per_example": per,
    })
    return res, drift


def gt_call(ground_truth: list[dict]) -> list[dict]:
    """A correct call list from BFCL possible answers (first acceptable value; optional params omitted)."""
    calls = []
    for k, call in enumerate(ground_truth):
        (name, params), = call.items()
        args = {p: vals[0] for p, vals in params.items() if vals and vals[0] != ""}
        calls.append({"id": f"gt_{k}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls


def gt_call_logprob(model_a, model_b, tok, trajs: list[Trajectory], cfg: EvalConfig) -> dict:
    """Mean per-token log-prob of the ground-truth call under A and B (one per task)."""
    from opsd.render import render
    from opsd.train.scoring import span_logprobs

    ids, spans, seen = [], [], set()
    for t in trajs:
        gt = t.meta.get("ground_truth")
        tid = t.meta.get("task_id", t.id)
        if not gt or tid in seen:
            continue
        seen.add(tid)
        ref = Trajectory(tid, t.messages[:-1] + [{"role": "assistant", "content": None, "tool_calls": gt_call(gt)}],
                         t.tools)
        r = render(ref, tok)
        ids.append(r.input_ids)
        spans.append(r.body_spans[-1])
    if not ids:
        return {"n": 0}
    pad = tok.pad_token_id or 0
    a = span_logprobs(model_a, ids, spans, batch_size=cfg.score_batch_size, pad_id=pad).token_logprobs
    b = span_logprobs(model_b, ids, spans, batch_size=cfg.score_batch_size, pad_id=pad).token_logprobs
    ma, mb = _mean(x.mean().item() for x in a), _mean(x.mean().item() for x in b)
    return {"n": len(ids), "before": ma, "after": mb, "delta": mb - ma}


# ----------------------------------------------------------------------------- orchestration
def _rollouts(model: str, name: str, cfg: EvalConfig, prefill: str) -> list[Trajectory]:
    from opsd.rollout.run import RolloutConfig, load_rollouts
    from opsd.rollout.run import main as rollout_main

    path = Path(cfg.out) / f"rollouts_{name}.jsonl"
    rcfg = RolloutConfig(tasks=cfg.tasks, out=str(path), model=model, limit=cfg.limit, prefill=prefill,
                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=cfg.device)
    rollout_main(rcfg)
    return load_rollouts(rcfg)


def main(cfg: EvalConfig, critique_fn: CritiqueFn, *, log=print) -> dict:
    from opsd.io import models
    from opsd.rollout.run import RolloutConfig

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prefill = cfg.prefill if cfg.prefill is not None else RolloutConfig(model=cfg.before).resolved_prefill()
    log(f"[eval 1/4] rollouts of before={cfg.before} and after={cfg.after} on {cfg.tasks} (limit {cfg.limit})")
    trajs_a = _rollouts(cfg.before, "before", cfg, prefill)
    trajs_b = _rollouts(cfg.after, "after", cfg, prefill)
    log("[eval 2/4] critiques")
    crit_a = critique_fn(trajs_a, out / "critiques_before.jsonl")
    crit_b = critique_fn(trajs_b, out / "critiques_after.jsonl")
    report: dict = {"version": REPORT_VERSION, "config": asdict(cfg) | {"prefill": prefill},
                    "behaviour": {"before": behaviour_stats(trajs_a, crit_a), "after": behaviour_stats(trajs_b, crit_b)}}
    log("[eval 3/4] teacher-forced error-span metrics and collateral drift")
    model_a, tok = models.load(cfg.before, device=cfg.device)
    model_b, _ = models.load(cfg.after, device=cfg.device)
    prefill_len = len(tok(prefill, add_special_tokens=False)["input_ids"]) if prefill else 0
    with torch.no_grad():
        report["teacher_forced"], drift = teacher_forced_and_drift(model_a, model_b, tok, trajs_a, crit_a, cfg,
                                                                   prefill_len)
        report["collateral"] = drift | {"gt_call_logprob": gt_call_logprob(model_a, model_b, tok, trajs_a, cfg)}
    if cfg.train_run and (Path(cfg.train_run) / "metrics.jsonl").exists():
        from opsd.train.diagnostics import summarise

        report["training_metrics"] = str(Path(cfg.train_run) / "metrics.jsonl")
        report["training_diagnostics"] = summarise(Path(cfg.train_run) / "metrics.jsonl")
    log("[eval 4/4] writing report")
    from opsd.eval.report import write_report

    write_report(report, out)
    return report
