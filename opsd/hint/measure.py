"""Hint effect: one teacher pass (hinted sequence) and one student pass per example, before training.

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

from opsd.train.records import TeacherTopK
from opsd.train.scoring import eval_mode, span_logprobs
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
    out = []
    for i, e in enumerate(examples):
        q0, q1 = e.meta.get("quote_span", e.student_span)
        lo, hi = q0 - e.student_span[0], q1 - e.student_span[0]  # quote tokens inside the target span
        delta_Q = (t.token_logprobs[i] - s.token_logprobs[i])[lo:hi]  # (Lq,)
        topk = None
        if top_k:
            topk = TeacherTopK(t.topk_ids[i].tolist(), t.topk_logprobs[i].tolist(), t.topk_tail_logprobs[i].tolist(),
                               t.token_logprobs[i].tolist())
        out.append(HintMeasure(delta_Q.mean().item(), delta_Q[0].item(), s.token_logprobs[i][lo:hi].mean().item(),
                               topk))
    return out
