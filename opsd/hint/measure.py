"""Hint effect: one teacher pass (hinted sequence) and one student pass per example, before training.

When the teacher is the student's own module, both sequences of an example are scored as one group
(`opsd.train.shared_prefix`): the prompt above the hint runs once, and only the hint and the reply
run for each (the same numbers, in less time).

    from opsd.hint.measure import measure
    m = measure(lm, lm, examples)            # the model is its own hinted teacher
    m[i].hint_effect                         # mean over the quoted error tokens of teacher − student log-prob
    measure(t_lm, s_lm, examples, top_k=256, temperature=1.0)[i].teacher_topk   # precomputed top-k targets

The hint effect is the mean, over the quoted error tokens, of (teacher log-prob − student
log-prob) of the actual tokens: negative means the hint lowers the error, which is what OPSD
distils. Both passes run at temperature 1 in eval mode (restored after); the caller picks the
weights (a teacher with LoRA adapters disabled, autocast, ...). With `top_k` the teacher's top-k
per target token is kept too (at the training `temperature`), with the exact log-mass outside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from opsd.train.records import TeacherTopK
from opsd.train.scoring import eval_mode, span_logprobs, topk_with_tail
from opsd.train.shared_prefix import Member, grouped_span_scores
from opsd.types import HintedExample


@dataclass
class HintMeasure:
    hint_effect: float  # mean over the quoted error tokens (nats; negative: the hint lowers the error)
    hint_effect_first: float  # at the first error token
    student_logprob: float  # the student's mean log-prob of the error tokens
    teacher_topk: TeacherTopK | None = None  # with top_k > 0: the teacher's targets on every target token

    def scores(self) -> dict[str, float]:
        return {"hint_effect": self.hint_effect, "hint_effect_first": self.hint_effect_first,
                "student_logprob": self.student_logprob}

    def to_dict(self) -> dict:
        """Flat keys, as in examples.jsonl."""
        d = self.scores()
        if self.teacher_topk is not None:
            tk = self.teacher_topk
            d |= {"teacher_topk_ids": tk.ids, "teacher_topk_logprobs": tk.logprobs,
                  "teacher_topk_tail_logprobs": tk.tail_logprobs, "teacher_target_logprobs": tk.target_logprobs}
        return d


def measure(teacher_lm, student_lm, examples: list[HintedExample], *, batch_size: int = 8, top_k: int = 0,
            temperature: float = 1.0, pad_id: int = 0) -> list[HintMeasure]:
    """Hint effect of every example (see module docstring), and with `top_k` > 0 the teacher's top-k targets."""
    if not examples:
        return []
    if teacher_lm is student_lm:  # the model is its own hinted teacher: the shared prompt runs once
        with eval_mode(student_lm):
            return _measure_shared(student_lm, examples, batch_size, top_k, temperature, pad_id)
    t_ids, t_spans = [e.teacher_ids for e in examples], [e.teacher_span for e in examples]
    with eval_mode(teacher_lm):  # hint effect at temperature 1; top-k targets at the training temperature
        t = span_logprobs(teacher_lm, t_ids, t_spans, batch_size=batch_size, pad_id=pad_id,
                          top_k=top_k if temperature == 1.0 else 0)
        if top_k and temperature != 1.0:
            tk = span_logprobs(teacher_lm, t_ids, t_spans, batch_size=batch_size, pad_id=pad_id, top_k=top_k,
                               temperature=temperature)
            t.topk_ids, t.topk_logprobs, t.topk_tail_logprobs = tk.topk_ids, tk.topk_logprobs, tk.topk_tail_logprobs
    with eval_mode(student_lm):
        s = span_logprobs(student_lm, [e.student_ids for e in examples], [e.student_span for e in examples],
                          batch_size=batch_size, pad_id=pad_id)
    topks = [TeacherTopK(t.topk_ids[i].tolist(), t.topk_logprobs[i].tolist(), t.topk_tail_logprobs[i].tolist(),
                         t.token_logprobs[i].tolist()) for i in range(len(examples))] if top_k else [None] * len(examples)
    return [_measured(e, t_lp, s_lp, tk) for e, t_lp, s_lp, tk in zip(examples, t.token_logprobs, s.token_logprobs, topks)]


def _measured(e: HintedExample, t_lp: torch.Tensor, s_lp: torch.Tensor, topk: TeacherTopK | None) -> HintMeasure:
    spans = e.meta.get("quote_spans") or [e.meta.get("quote_span", e.student_span)]  # every error's tokens
    s0, s1 = e.student_span
    rows = sorted({p - s0 for q0, q1 in spans for p in range(q0, q1) if s0 <= p < s1})
    rows_Q = torch.tensor(rows or list(range(s1 - s0)))  # (Lq,) the error tokens; a span without them (random): its own
    delta_Q = (t_lp - s_lp)[rows_Q]  # (Lq,)
    return HintMeasure(delta_Q.mean().item(), delta_Q[0].item(), s_lp[rows_Q].mean().item(), topk)


def _measure_shared(lm, examples: list[HintedExample], batch_size: int, top_k: int, temperature: float,
                    pad_id: int) -> list[HintMeasure]:
    """`measure(lm, lm, ...)` with each example's student and hinted sequences in one group: the prompt they share
    (everything above the hint) runs once. With `top_k`, the hinted rows give the targets: a log-softmax of the
    rows at `temperature` is the log-softmax of the logits at it (the rows differ from them by a constant)."""
    groups = [[Member(e.student_ids, tuple(e.student_span)), Member(e.teacher_ids, tuple(e.teacher_span), rows=bool(top_k))]
              for e in examples]
    out = []
    for e, (s_lp, t) in zip(examples, grouped_span_scores(lm, groups, batch_size=batch_size, pad_id=pad_id)):
        topk = None
        if top_k:
            t_lp = t.gather(-1, torch.tensor(e.teacher_ids[e.teacher_span[0]:e.teacher_span[1]])[:, None])[:, 0]
            rows = t if temperature == 1.0 else torch.log_softmax(t / temperature, dim=-1)
            top, tail = topk_with_tail(rows, top_k)
            topk = TeacherTopK(top.indices.tolist(), top.values.tolist(), tail.tolist(), t_lp.tolist())
            t = t_lp
        out.append(_measured(e, t, s_lp, topk))
    return out
