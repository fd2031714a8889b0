"""Teacher modes: which weights read the hinted (or instructed) sequence and give the targets.

- `initial` (default): the weights at the start of this run (of this `main(cfg)` call), frozen.
  With LoRA: the same module with its adapters disabled (no extra memory). Without LoRA: in OPSD
  mode its top-k targets are precomputed before the first update (`--precompute-targets auto`),
  and a frozen copy is kept only where the loop still needs the teacher (GKD, or cold-start
  samples; a copy costs one more model in memory).
- `self`: the student's current weights, under no grad, in eval mode, on the hinted sequence. No
  second copy, but the target moves with the student: RESULTS.md run 1 overshot into collapse.
- `ema`: an exponential moving average of the student's trainable weights, kept in a copy.
- `external`: another model that shares the student's tokenizer (vocab sizes must match).

Every teacher gives `logits(batch) -> (N, V)` at the target positions only (`opsd.train.scoring`),
and `model()`, a context with the plain HF model in eval mode (for sampling and for measuring
hint effects). Teachers that read the live student call it through its prepared wrapper
(`opsd.train.student.Student`).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from opsd.train.scoring import SpanBatch, _causal_lm, eval_mode, span_logits
from opsd.train.shared_prefix import logits_after_student
from opsd.train.student import Student


class Teacher:
    """Targets from some weights: `logits(batch)`, `model()` (plain HF model in eval mode), `update(student)`."""

    name = "teacher"

    def logits(self, batch: SpanBatch) -> torch.Tensor:
        raise NotImplementedError

    def model(self):
        raise NotImplementedError

    def update(self, student: Student) -> None:
        """Called after every optimizer step."""

    def resumed(self, step: int) -> None:
        """Called when a run resumes at `step` (the state of the teachers that have one comes from the checkpoint)."""


class LiveTeacher(Teacher):
    """The student's own module: `self` (current weights), or `initial` with its LoRA adapters disabled.

    `until_first_update`: the teacher is the initial weights only until the first optimizer step
    (teacher=initial without LoRA, used to precompute targets); using it later raises.
    """

    def __init__(self, student: Student, *, name: str = "self", adapters_off: bool = False,
                 until_first_update: bool = False):
        self.student, self.name, self.adapters_off = student, name, adapters_off
        self.until_first_update, self.expired = until_first_update, False

    @contextlib.contextmanager
    def _frozen(self):
        if self.expired:
            raise RuntimeError(f"teacher={self.name} read the live student after an update: the initial weights "
                               "are gone (this mode precomputes its targets; keep a frozen copy for later use)")
        with self.student.lm.disable_adapter() if self.adapters_off else contextlib.nullcontext():
            yield

    @torch.no_grad()
    def logits(self, batch: SpanBatch) -> torch.Tensor:
        with self._frozen(), eval_mode(self.student.span_lm):
            return self.student.logits(batch).float()

    @property
    def reads_student_kv(self) -> bool:
        """Whether this teacher is the student's current weights as they are (teacher=self, adapters on), so that
        its pass over a hinted sequence may start from the student's keys/values of the tokens above the hint."""
        return not (self.adapters_off or self.until_first_update)

    @torch.no_grad()
    def logits_after_student(self, cache, records, pad_id: int) -> torch.Tensor:
        """`logits(batch)` of the records' teacher sequences, from the student's forward's `cache` (see
        `opsd.train.shared_prefix.logits_after_student`)."""
        with self._frozen(), eval_mode(self.student.span_lm), self.student.accelerator.autocast():
            return logits_after_student(self.student.lm, cache, [r.student_ids for r in records],
                                        [r.teacher_ids for r in records], [tuple(r.teacher_span) for r in records],
                                        pad_id).float()

    @contextlib.contextmanager
    def model(self) -> Iterator[torch.nn.Module]:
        with self._frozen(), self.student.full_weights(f"teacher={self.name} sampling") as lm, eval_mode(lm), \
                self.student.accelerator.autocast():
            yield lm

    def update(self, student: Student) -> None:
        self.expired = self.until_first_update

    def resumed(self, step: int) -> None:
        self.expired = self.until_first_update and step > 0


class ModelTeacher(Teacher):
    """A model of its own: an external teacher, or a frozen copy of the initial student."""

    def __init__(self, lm, *, name: str, autocast=contextlib.nullcontext):
        self.lm, self.name, self.autocast = lm.requires_grad_(False).eval(), name, autocast

    @torch.no_grad()
    def logits(self, batch: SpanBatch) -> torch.Tensor:
        dev = next(self.lm.parameters()).device
        with eval_mode(self.lm), self.autocast():
            return span_logits(self.lm, batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.batch_idx.to(dev),
                               batch.pos.to(dev)).float()

    @contextlib.contextmanager
    def model(self) -> Iterator[torch.nn.Module]:
        with eval_mode(self.lm), self.autocast():
            yield self.lm


class EmaTeacher(ModelTeacher):
    """teacher = decay * teacher + (1 - decay) * student, over the trainable weights, after each step."""

    def __init__(self, student: Student, decay: float, **kw):
        super().__init__(copy.deepcopy(student.lm), name="ema", **kw)
        self.decay = decay
        self._trainable = [p.requires_grad for p in student.lm.parameters()]

    @torch.no_grad()
    def update(self, student: Student) -> None:
        with student.full_weights("teacher=ema") as lm:
            for e, p, trained in zip(self.lm.parameters(), lm.parameters(), self._trainable):
                if trained:
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


def make_teacher(kind: str, student: Student, *, lora: bool, frozen_copy: bool = False, ema_decay: float = 0.99,
                 external_lm=None) -> Teacher:
    """The teacher for `kind` (see module docstring); build it before the first update.

    `frozen_copy` (kind=initial without LoRA): keep a copy of the starting weights, for a loop that
    needs the teacher after the first update; else the teacher lives only until then.
    """
    autocast = student.accelerator.autocast
    if kind == "self":
        return LiveTeacher(student)
    if kind == "initial":
        if lora:
            return LiveTeacher(student, name="initial", adapters_off=True)
        if frozen_copy:
            return ModelTeacher(copy.deepcopy(student.lm), name="initial", autocast=autocast)
        return LiveTeacher(student, name="initial", until_first_update=True)
    if kind == "ema":
        return EmaTeacher(student, ema_decay, autocast=autocast)
    if kind == "external":
        if external_lm is None:
            raise ValueError("teacher=external needs a teacher model")
        check_same_vocab(student.lm, external_lm)
        return ModelTeacher(external_lm, name="external", autocast=autocast)
    raise ValueError(f"unknown teacher {kind!r}")
