"""Teacher modes for OPSD training, and the pre-training teacher pass (hint effect, top-k targets).

- `self` (default): the student's current weights, under no grad, in eval mode, on the hinted
  sequence. No second model copy.
- `initial`: the frozen starting weights. With LoRA: the same module with adapters disabled
  (no extra memory). Without LoRA: top-k targets precomputed once (`--precompute-targets`).
- `ema`: an exponential moving average of the student's trainable weights, kept in a copy.
- `external`: another model that shares the student's tokenizer (vocab sizes must match).

All of them expose `logits(batch) -> (N, V)` at the span positions only (see `opsd.train.scoring`).
`measure` runs the teacher and the student over every example once before training: it gives
the hint effect (teacher − student log-prob of the error tokens) and, when asked, the teacher's
top-k per span token.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from opsd.train.scoring import SpanBatch, _causal_lm, span_logits, span_logprobs
from opsd.types import HintedExample


class Teacher:
    """A teacher that reads the hinted sequence with some weights. `update` runs after each step."""

    name = "self"

    def __init__(self, lm, *, disable_adapters: bool = False, autocast=contextlib.nullcontext):
        self.lm, self.disable_adapters, self.autocast = lm, disable_adapters, autocast

    @contextlib.contextmanager
    def active(self):
        """Eval mode (restored after), and LoRA adapters off for the `initial` teacher."""
        was_training = self.lm.training
        self.lm.eval()
        try:
            with (self.lm.disable_adapter() if self.disable_adapters else contextlib.nullcontext()), self.autocast():
                yield self.lm
        finally:
            self.lm.train(was_training)

    @torch.no_grad()
    def logits(self, batch: SpanBatch) -> torch.Tensor:
        """Teacher logits (N, V) predicting the span tokens of the (hinted) batch."""
        dev = next(self.lm.parameters()).device
        with self.active() as lm:
            return span_logits(lm, batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.batch_idx.to(dev),
                               batch.pos.to(dev)).float()

    def update(self, student_lm) -> None:
        pass


class EmaTeacher(Teacher):
    """teacher = decay * teacher + (1 - decay) * student, over the trainable weights, after each step."""

    name = "ema"

    def __init__(self, student_lm, decay: float, **kw):
        super().__init__(copy.deepcopy(student_lm).requires_grad_(False).eval(), **kw)
        self.decay = decay
        self._pairs = [(e, p) for e, p in zip(self.lm.parameters(), student_lm.parameters()) if p.requires_grad]

    @torch.no_grad()
    def update(self, student_lm) -> None:
        for e, p in self._pairs:
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)


def vocab_size(lm) -> int:
    return _causal_lm(lm).get_output_embeddings().weight.shape[0]


def check_same_vocab(student_lm, teacher_lm, student_tok=None, teacher_tok=None) -> None:
    """External teachers must share the student's tokenizer; raise naming both sizes otherwise."""
    vs, vt = vocab_size(student_lm), vocab_size(teacher_lm)
    if vs != vt:
        raise ValueError(f"external teacher vocab size {vt} != student vocab size {vs}: the teacher must use the "
                         "student's tokenizer (token ids are compared position by position)")
    if student_tok is not None and teacher_tok is not None and student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(f"external teacher tokenizer ({len(teacher_tok)} tokens) differs from the student's "
                         f"({len(student_tok)} tokens) although the vocab sizes match ({vs})")


def make_teacher(kind: str, student_lm, *, lora: bool, ema_decay: float = 0.99, external_lm=None,
                 autocast=contextlib.nullcontext) -> Teacher:
    """The teacher for `kind` (see module docstring). `external_lm` is needed for kind=external."""
    if kind == "self":
        return Teacher(student_lm, autocast=autocast)
    if kind == "initial":
        # without LoRA the initial teacher exists only before training: it is used to precompute targets
        t = Teacher(student_lm, disable_adapters=lora, autocast=autocast)
        t.name = "initial"
        return t
    if kind == "ema":
        return EmaTeacher(student_lm, ema_decay, autocast=autocast)
    if kind == "external":
        if external_lm is None:
            raise ValueError("teacher=external needs a teacher model")
        check_same_vocab(student_lm, external_lm)
        t = Teacher(external_lm.requires_grad_(False), autocast=autocast)
        t.name = "external"
        return t
    raise ValueError(f"unknown teacher {kind!r}")


def measure(teacher: Teacher, student_lm, examples: list[HintedExample], *, batch_size: int = 8, top_k: int = 0,
            temperature: float = 1.0, pad_id: int = 0) -> list[dict]:
    """One teacher pass and one student pass per example, before training.

    Returns per example: `hint_effect` = mean over the quoted error tokens of
    (teacher log-prob − student log-prob) of the actual tokens (negative: the hint lowers the
    error), `hint_effect_first` (first error token), `student_logprob` (mean), and with top_k
    > 0 the teacher's `teacher_topk_ids` / `teacher_topk_logprobs` (L, k) per span token.
    """
    if not examples:
        return []
    t_ids, t_spans = [e.teacher_ids for e in examples], [e.teacher_span for e in examples]
    with teacher.active() as t_lm:  # hint effect at temperature 1; top-k targets at the training temperature
        t = span_logprobs(t_lm, t_ids, t_spans, batch_size=batch_size, pad_id=pad_id,
                          top_k=top_k if temperature == 1.0 else 0)
        if top_k and temperature != 1.0:
            tk = span_logprobs(t_lm, t_ids, t_spans, batch_size=batch_size, pad_id=pad_id, top_k=top_k,
                               temperature=temperature)
            t.topk_ids, t.topk_logprobs = tk.topk_ids, tk.topk_logprobs
    was_training = student_lm.training
    student_lm.eval()
    try:
        s = span_logprobs(student_lm, [e.student_ids for e in examples], [e.student_span for e in examples],
                          batch_size=batch_size, pad_id=pad_id)
    finally:
        student_lm.train(was_training)
    out = []
    for i, e in enumerate(examples):
        q0, q1 = e.meta.get("quote_span", e.student_span)
        lo, hi = q0 - e.student_span[0], q1 - e.student_span[0]  # quote tokens inside the target span
        delta = (t.token_logprobs[i] - s.token_logprobs[i])[lo:hi]  # (Lq,)
        rec = {"hint_effect": delta.mean().item(), "hint_effect_first": delta[0].item(),
               "student_logprob": s.token_logprobs[i][lo:hi].mean().item()}
        if top_k:
            rec["teacher_topk_ids"] = t.topk_ids[i].tolist()
            rec["teacher_topk_logprobs"] = t.topk_logprobs[i].tolist()
            rec["teacher_target_logprobs"] = t.token_logprobs[i].tolist()  # exact, for teacher/hint_effect
        out.append(rec)
    return out
