"""`TrainRecord`: the typed unit of training data, from the data sources to the micro-batches.

    from opsd.train.records import TrainRecord
    rec = TrainRecord.from_example(hinted_example, scores={"hint_effect": -0.4})   # OPSD
    rec.student_ids[slice(*rec.student_span)] == rec.teacher_ids[slice(*rec.teacher_span)]  # True
    rec.with_reply(sampled_ids)           # the same prompts, a new target (GKD samples, cold start)
    TrainRecord.from_dict(json.loads(line)) / rec.to_dict()                          # OUT/examples.jsonl

A record is one pair of sequences: the student's ids and the teacher's ids (the same tokens, the
teacher's prompt may carry a hint or an instruction), each with the [start, end) span of target
tokens; both spans cover the SAME tokens. It may carry what was measured before training
(`scores`: hint effect, top-k overlap), the teacher's precomputed top-k targets (`teacher_topk`),
the prompt messages a reward function needs (`prompt`, GKD) and a REINFORCE `advantage`
(GKD+RL samples). On disk a record is one flat JSON object (the keys `to_dict` writes).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from opsd.types import HintedExample

SCORE_KEYS = ("hint_effect", "hint_effect_first", "student_logprob", "overlap")  # measured before training


@dataclass
class TeacherTopK:
    """The teacher's precomputed targets, one row per target token (L rows of k)."""

    ids: list[list[int]]  # (L, k)
    logprobs: list[list[float]]  # (L, k) at the training temperature
    tail_logprobs: list[float] | None  # (L,) exact log-mass outside the k tokens (None in runs before it was stored)
    target_logprobs: list[float] | None  # (L,) the teacher's log-prob of each actual target token, at T = 1


@dataclass
class Prompt:
    """What came before the target reply, as messages (GKD: a reward function reads it)."""

    messages: list[dict]
    tools: list[dict] = field(default_factory=list)


@dataclass
class TrainRecord:
    id: str
    student_ids: list[int]
    student_span: tuple[int, int]
    teacher_ids: list[int]
    teacher_span: tuple[int, int]
    meta: dict = field(default_factory=dict)  # OPSD: the HintedExample's meta; GKD: the trajectory's meta
    prompt: Prompt | None = None
    scores: dict[str, float] = field(default_factory=dict)  # keys from SCORE_KEYS
    teacher_topk: TeacherTopK | None = None
    advantage: float | None = None  # GKD+RL: reward minus the per-prompt mean

    def __post_init__(self) -> None:
        self.student_span, self.teacher_span = tuple(self.student_span), tuple(self.teacher_span)
        (s0, s1), (t0, t1) = self.student_span, self.teacher_span
        if s1 - s0 != t1 - t0 or s1 < s0:
            raise ValueError(f"record {self.id!r}: spans must have equal length: {self.student_span} vs {self.teacher_span}")
        if self.student_ids[s0:s1] != self.teacher_ids[t0:t1]:
            raise ValueError(f"record {self.id!r}: student and teacher spans do not cover the same tokens")
        if self.teacher_topk is not None and len(self.teacher_topk.ids) != s1 - s0:
            raise ValueError(f"record {self.id!r}: {len(self.teacher_topk.ids)} top-k rows for {s1 - s0} target tokens")

    @property
    def target_mask(self) -> list[float] | None:
        """The weight of each span token, when not all 1: an OPSD example of several errors (meta `quote_spans`,
        span kind `quote`) spans from the first error to the last, and only the error tokens carry loss (1, else 0);
        with meta `anchor` (`--anchor`, span kind `step`) the error tokens weigh 1 and the rest of the reply `anchor`."""
        spans, anchor = self.meta.get("quote_spans"), self.meta.get("anchor")
        if anchor:
            spans = spans or [self.meta["quote_span"]]
        elif not spans or self.meta.get("span", "quote") != "quote":
            return None
        hit = {p for q0, q1 in spans for p in range(q0, q1)}
        rest = float(anchor or 0.0)
        return [1.0 if p in hit else rest for p in range(self.student_span[0], self.student_span[1])]

    @property
    def n_targets(self) -> float:
        """Tokens that carry loss, weighted (the whole span unless `target_mask` says otherwise)."""
        mask = self.target_mask
        return self.student_span[1] - self.student_span[0] if mask is None else sum(mask)

    def prefixes(self) -> tuple[list[int], list[int]]:
        """Student and teacher ids before the target span: the prompts a new reply continues."""
        return self.student_ids[:self.student_span[0]], self.teacher_ids[:self.teacher_span[0]]

    def with_reply(self, reply: list[int], prefill: list[int] = ()) -> TrainRecord:
        """This record with its target replaced by `prefill` (context, not trained on) + `reply` (the new target).

        What was measured or precomputed for the old target is dropped with it.
        """
        s, t = (p + list(prefill) for p in self.prefixes())
        return replace(self, student_ids=s + list(reply), student_span=(len(s), len(s) + len(reply)),
                       teacher_ids=t + list(reply), teacher_span=(len(t), len(t) + len(reply)), scores={},
                       teacher_topk=None, advantage=None, meta={k: v for k, v in self.meta.items() if k not in ("quote_spans", "anchor")})

    @classmethod
    def from_example(cls, ex: HintedExample, *, scores: dict | None = None,
                     teacher_topk: TeacherTopK | None = None) -> TrainRecord:
        return cls(str(ex.meta.get("trajectory_id", "")), list(ex.student_ids), tuple(ex.student_span),
                   list(ex.teacher_ids), tuple(ex.teacher_span), dict(ex.meta), scores=dict(scores or {}),
                   teacher_topk=teacher_topk)

    def to_dict(self) -> dict:
        d = {"id": self.id, "student_ids": self.student_ids, "student_span": list(self.student_span),
             "teacher_ids": self.teacher_ids, "teacher_span": list(self.teacher_span), "meta": self.meta}
        if self.prompt is not None:
            d |= {"messages": self.prompt.messages, "tools": self.prompt.tools}
        d |= self.scores
        if self.teacher_topk is not None:
            tk = self.teacher_topk
            d |= {"teacher_topk_ids": tk.ids, "teacher_topk_logprobs": tk.logprobs}
            d |= {"teacher_topk_tail_logprobs": tk.tail_logprobs} if tk.tail_logprobs is not None else {}
            d |= {"teacher_target_logprobs": tk.target_logprobs} if tk.target_logprobs is not None else {}
        if self.advantage is not None:
            d["advantage"] = self.advantage
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainRecord:
        topk = None
        if "teacher_topk_ids" in d:
            topk = TeacherTopK(d["teacher_topk_ids"], d["teacher_topk_logprobs"], d.get("teacher_topk_tail_logprobs"),
                               d.get("teacher_target_logprobs"))
        meta = d.get("meta") or {}
        return cls(str(d.get("id") or meta.get("trajectory_id", "")), d["student_ids"], tuple(d["student_span"]),
                   d["teacher_ids"], tuple(d["teacher_span"]), meta,
                   prompt=Prompt(d["messages"], d.get("tools") or []) if "messages" in d else None,
                   scores={k: d[k] for k in SCORE_KEYS if k in d}, teacher_topk=topk, advantage=d.get("advantage"))
