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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from opsd.types import Critique, Trajectory

REPORT_VERSION = 1
CritiqueFn = Callable[[list[Trajectory], Path], list[Critique]]


@dataclass
class EvalConfig:
    before: str = "smollm2-135m-instruct"  # model A (the student before training)
    after: str = "runs/demo/model"  # model B (after training)
    tasks: str = "bfcl:simple_python,multiple:heldout"  # held-out task spec or task file
    out: str = "runs/demo/report"  # report folder
    limit: int | None = 64  # first N tasks
    max_new_tokens: int = 128  # rollout budget per reply
    batch_size: int = 16  # rollout batch
    score_batch_size: int = 8  # teacher-forced scoring batch
    prefill: str | None = None  # reply prefill (None: decided from --before, used for both models)
    placement: str = "user"  # hint placement for the hinted-teacher reference
    span: str = "quote"  # target span kind for teacher-forced metrics
    train_run: str | None = None  # training run folder: adds training curves from its metrics.jsonl
    device: str | None = None  # cuda | cpu

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")


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


# ----------------------------------------------------------------------------- teacher-forced
def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


def teacher_forced(model_a, model_b, tok, trajs: list[Trajectory], critiques: list[Critique], cfg: EvalConfig) -> dict:
    """Error-span metrics on A's critiqued errors (see module docstring)."""
    from opsd.hinting import build_examples
    from opsd.scoring import span_logprobs

    examples, counts = build_examples(trajs, critiques, tok, placement=cfg.placement, span=cfg.span)
    res = {"n_examples": len(examples), "build_counts": dict(counts)}
    if not examples:
        return res
    pad = tok.pad_token_id or 0
    s_ids = [e.student_ids for e in examples]
    s_sp = [tuple(e.student_span) for e in examples]
    a = span_logprobs(model_a, s_ids, s_sp, batch_size=cfg.score_batch_size, top_k=1, pad_id=pad)
    b = span_logprobs(model_b, s_ids, s_sp, batch_size=cfg.score_batch_size, top_k=1, pad_id=pad)
    h = span_logprobs(model_a, [e.teacher_ids for e in examples], [tuple(e.teacher_span) for e in examples],
                      batch_size=cfg.score_batch_size, pad_id=pad)
    per = []
    for i, e in enumerate(examples):
        first = e.student_ids[e.student_span[0]]
        per.append({
            "trajectory_id": e.meta["trajectory_id"], "category": e.meta.get("category"),
            "span_tokens": e.student_span[1] - e.student_span[0],
            "before": a.token_logprobs[i].mean().item(), "after": b.token_logprobs[i].mean().item(),
            "hinted": h.token_logprobs[i].mean().item(),
            "first_before": a.token_logprobs[i][0].item(), "first_after": b.token_logprobs[i][0].item(),
            "first_hinted": h.token_logprobs[i][0].item(),
            "argmax_before_is_error": int(a.topk_ids[i][0, 0]) == first,
            "argmax_after_is_error": int(b.topk_ids[i][0, 0]) == first,
        })
    mb, ma, mh = _mean(p["before"] for p in per), _mean(p["after"] for p in per), _mean(p["hinted"] for p in per)
    greedy = [p for p in per if p["argmax_before_is_error"]]
    res.update({
        "error_span_logprob": {"before": mb, "after": ma, "hinted": mh, "delta": ma - mb},
        "first_token_logprob": {"before": _mean(p["first_before"] for p in per),
                                "after": _mean(p["first_after"] for p in per),
                                "hinted": _mean(p["first_hinted"] for p in per)},
        "fraction_lowered": _mean(float(p["after"] < p["before"]) for p in per),
        "argmax_flip_rate": _mean(float(not p["argmax_after_is_error"]) for p in greedy) if greedy else None,
        "argmax_flip_base": len(greedy),
        "hint_effect": mh - mb,
        "gap_closed": (ma - mb) / (mh - mb) if abs(mh - mb) > 1e-9 else None,
        "per_example": per,
    })
    res["first_token_logprob"]["delta"] = res["first_token_logprob"]["after"] - res["first_token_logprob"]["before"]
    return res


def _kl_on_spans(model_a, model_b, ids_list, spans, batch: int, pad: int) -> tuple[float, int]:
    """Mean per-token KL(A||B) over the given spans, computed chunk by chunk (full rows only per chunk)."""
    from opsd.scoring import span_logprobs

    total, n = 0.0, 0
    for k in range(0, len(ids_list), batch):
        ids, sp = ids_list[k:k + batch], spans[k:k + batch]
        ra = span_logprobs(model_a, ids, sp, batch_size=batch, return_rows=True, pad_id=pad).rows
        rb = span_logprobs(model_b, ids, sp, batch_size=batch, return_rows=True, pad_id=pad).rows
        for la, lb in zip(ra, rb):  # (L, V) log-probs
            total += (la.exp() * (la - lb)).sum(-1).clamp(min=0).sum().item()  # KL(A||B) = sum pA (log pA - log pB)
            n += la.shape[0]
    return (total / n if n else float("nan")), n


def collateral(model_a, model_b, tok, trajs: list[Trajectory], critiques: list[Critique], cfg: EvalConfig,
               prefill_len: int) -> dict:
    from opsd.render import render

    by_id = {c.trajectory_id: c for c in critiques}
    err_ids, err_sp, clean_ids, clean_sp = [], [], [], []
    for t in trajs:
        c = by_id.get(t.id)
        if c is None or c.verdict == "failed":
            continue
        r = render(t, tok)
        step = len(t.messages) - 1
        bs, be = r.body_spans[step]
        bs = min(bs + prefill_len, be)  # generated tokens only (the prefill was forced)
        if c.verdict == "ok":
            if be > bs:
                clean_ids.append(r.input_ids)
                clean_sp.append((bs, be))
            continue
        try:
            qs, qe = r.quote_span(c.step, c.quote) if c.step == step else (be, be)
        except ValueError:
            continue
        for s, e in ((bs, min(qs, be)), (max(qe, bs), be)):
            if e > s:
                err_ids.append(r.input_ids)
                err_sp.append((s, e))
    pad = tok.pad_token_id or 0
    kl_err, n_err = _kl_on_spans(model_a, model_b, err_ids, err_sp, cfg.score_batch_size, pad)
    kl_clean, n_clean = _kl_on_spans(model_a, model_b, clean_ids, clean_sp, cfg.score_batch_size, pad)
    return {"kl_outside_error_spans": {"mean": kl_err, "n_tokens": n_err},
            "kl_clean_trajectories": {"mean": kl_clean, "n_tokens": n_clean},
            "gt_call_logprob": gt_call_logprob(model_a, model_b, tok, trajs, cfg)}


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
    from opsd.scoring import span_logprobs

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
    from opsd.rollout import RolloutConfig, main as rollout_main
    from opsd.trajectories import load_trajectories

    path = Path(cfg.out) / f"rollouts_{name}.jsonl"
    rollout_main(RolloutConfig(tasks=cfg.tasks, out=str(path), model=model, limit=cfg.limit, prefill=prefill,
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=cfg.device))
    return load_trajectories(path)


def main(cfg: EvalConfig, critique_fn: CritiqueFn, *, log=print) -> dict:
    from opsd import models
    from opsd.rollout import RolloutConfig

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
        report["teacher_forced"] = teacher_forced(model_a, model_b, tok, trajs_a, crit_a, cfg)
        report["collateral"] = collateral(model_a, model_b, tok, trajs_a, crit_a, cfg, prefill_len)
    if cfg.train_run and (Path(cfg.train_run) / "metrics.jsonl").exists():
        report["training_metrics"] = str(Path(cfg.train_run) / "metrics.jsonl")
    log("[eval 4/4] writing report")
    from opsd.report import write_report

    write_report(report, out)
    return report
