"""Core types passed between stages. Everything is JSON-serialisable via `to_dict`.

- `Trajectory`: one agent episode in OpenAI chat format.
- `Critique`: a critic's verdict on one trajectory (which step, which quote, which hint).
- `HintedExample`: student/teacher token ids with aligned target spans (built by opsd.hint.build).
- `Task`: a prompt (messages + tools) to roll a student out on, with optional ground truth (opsd.io.tasks).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

VERDICTS = ("error", "ok", "failed")


PLACEMENTS = ("user", "system", "inline")  # where a hint goes (opsd.hint.build)
SPANS = ("quote", "step_from_error", "step", "random")  # which tokens are trained (opsd.hint.build)
DIVERGENCES = ("jsd", "forward_kl", "reverse_kl")  # opsd.train.losses
TEACHERS = ("self", "initial", "ema", "external")  # opsd.train.teachers


class StageError(RuntimeError):
    """A stage cannot go on for a reason the user can fix; the message says what and how (the CLI prints it, exit 1)."""


class ServerError(OSError):
    """An inference server (opsd.serve) could not be started or reached, died, or refused an operation; the message
    says why. (An OSError, like a refused connection, so the CLI reports it as one line, without a traceback.)"""


def content_hash(obj: Any) -> str:
    """Stable 16-hex-digit hash of a JSON-serialisable object (key order independent)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass
class Task:
    """A prompt a student is rolled out on, plus optional ground truth in BFCL's possible-answer format:
    [{"fn_name": {"param": [acceptable values...]}}] (loaded by opsd.io.tasks)."""
    id: str
    messages: list[dict]
    tools: list[dict]
    ground_truth: list[dict] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Trajectory:
    """One episode. `messages` are OpenAI chat messages; `tools` are function-tool schemas.

    An assistant message may carry `token_ids`: the exact ids of the turn body the model
    generated. Its `content` is then the decoded raw text of those ids (tool-call blocks
    included) and `tool_calls` are what was parsed from it; rendering uses the ids verbatim.
    """

    id: str
    messages: list[dict]
    tools: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "messages": self.messages, "tools": self.tools, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        return cls(id=str(d["id"]), messages=d["messages"], tools=d.get("tools") or [], meta=d.get("meta") or {})

    def content_hash(self) -> str:
        """Hash of what a critic sees (messages + tools), so edits invalidate cached critiques."""
        return content_hash({"messages": self.messages, "tools": self.tools})


@dataclass
class Critique:
    """A critic's verdict on one trajectory.

    verdict: "error" | "ok" | "failed". For "error", `step` is the index in `messages` of the
    erroneous assistant message and `quote` a verbatim substring of its rendered text
    (`opsd.render.message_text`). `quote_at` is the char offset of the quote in that text; when
    it is None the quote must occur exactly once there (an ambiguous quote is never guessed).
    For "failed", `error` says why (nothing is dropped); `retryable` marks a failure of the
    transport (server down, 5xx after all retries) that the next run retries.
    `disagreement` records a cross-check that overruled another critic (`schema+llm`).
    """

    trajectory_id: str
    verdict: str
    step: int | None = None
    quote: str | None = None
    hint: str | None = None
    category: str | None = None
    critic: dict = field(default_factory=dict)  # {"name": ..., "config_hash": ...}
    usage: dict = field(default_factory=dict)  # {"prompt_tokens": .., "completion_tokens": ..}
    error: str | None = None
    trajectory_hash: str | None = None  # Trajectory.content_hash() of what was critiqued
    quote_at: int | None = None  # char offset of `quote` in message_text(messages[step]); None = unique quote
    retryable: bool = False  # a transport failure: the next run retries it
    disagreement: dict | None = None  # {"overruled": {"name", "verdict"}, "by": critic name}
    # every error of the step (all_errors critics): [{"quote", "quote_at", "category", "hint"}], in text order, the
    # first one being quote/quote_at/category above; `hint` then states every fix. None: the one error above
    errors: list[dict] | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Critique":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass
class HintedExample:
    """Student ids (trajectory up to the erroneous step) and teacher ids (same, hint inserted).

    `student_span` and `teacher_span` are half-open [start, end) token ranges of equal length
    covering the SAME tokens; both id lists end at the span's last token.
    """

    student_ids: list[int]
    teacher_ids: list[int]
    student_span: tuple[int, int]
    teacher_span: tuple[int, int]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        s0, s1 = self.student_span
        t0, t1 = self.teacher_span
        if s1 - s0 != t1 - t0 or s1 <= s0:
            raise ValueError(f"spans must be non-empty and equal length: {self.student_span} vs {self.teacher_span}")
        if self.student_ids[s0:s1] != self.teacher_ids[t0:t1]:
            raise ValueError("student and teacher spans do not cover the same tokens")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["student_span"], d["teacher_span"] = list(self.student_span), list(self.teacher_span)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HintedExample":
        return cls(d["student_ids"], d["teacher_ids"], tuple(d["student_span"]), tuple(d["teacher_span"]), d.get("meta", {}))
