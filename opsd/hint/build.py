"""Hinted examples: insert a critique's hint right above the erroneous step, align target spans.

    from opsd.hint.build import build_example, build_examples
    ex = build_example(traj, critique, tokenizer)            # placement="user", span="quote"
    ex.student_ids[slice(*ex.student_span)] == ex.teacher_ids[slice(*ex.teacher_span)]  # True

The student sequence is the trajectory up to and including the erroneous step; the teacher
sequence is the same with the hint inserted right above that step. Both are cut after the last
target token: attention is causal, so nothing later changes the loss.

Placements:
- `user` (default): a new user message before the step, text from `prompts/hint_message.j2`;
- `system`: the hint appended to the system message (one is added when there is none);
- `inline`: `<hint>...</hint>` (configurable tags) inside the assistant turn, right before the
  quoted error, for reasoning traces. It is spliced at the token level, so the step's tokens
  stay exact.

Target spans: `quote` (the quoted error tokens, widened to whole tokens), `step_from_error`
(from the error to the end of the step, end-of-turn token included), `step` (the whole step), and
`random`: as many tokens as `quote`, placed at a seeded random offset among the step's generated
tokens (the matched-count control of `opsd compare`: the same hint and teacher, anywhere but by
design at the error).

Because `opsd.render` tokenises every message on its own, the tokens of the step are identical
with and without the extra hint message, so the two spans cover the SAME tokens by construction
(`HintedExample` checks it). A critique that cannot be built raises `HintError` with a short
`reason`; `build_examples` counts those per reason instead of dropping them silently.

    python -c "from opsd.hint.build import *; ..."   # see tests/train/test_hinting.py
"""
from __future__ import annotations

import random
from collections import Counter
from functools import lru_cache
from typing import Iterable

import jinja2

import opsd_prompts
from opsd.render import Rendered, message_text, prefill_length, render, with_system_text
from opsd.types import PLACEMENTS, SPANS, Critique, HintedExample, Trajectory

DEFAULT_INLINE_TAGS = ("<hint>", "</hint>")


class HintError(ValueError):
    """A critique that cannot be turned into a hinted example. `reason` is a short count key."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{reason}: {message}")


@lru_cache(maxsize=None)
def _hint_template() -> jinja2.Template:
    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(opsd_prompts.read("hint_message.j2"))


def hint_message_text(hint: str) -> str:
    """The user-turn text carrying `hint` (`prompts/hint_message.j2`)."""
    return _hint_template().render(hint=hint.strip()).strip()


def _check(traj: Trajectory, c: Critique) -> None:
    if c.verdict != "error":
        raise HintError(f"verdict_{c.verdict}", f"critique of {c.trajectory_id!r} has verdict {c.verdict!r}")
    if c.trajectory_id != traj.id:
        raise HintError("id_mismatch", f"critique is for {c.trajectory_id!r}, trajectory is {traj.id!r}")
    if not isinstance(c.step, int) or not 0 <= c.step < len(traj.messages):
        raise HintError("bad_step", f"step {c.step!r} out of range for {len(traj.messages)} messages in {traj.id!r}")
    if traj.messages[c.step].get("role") != "assistant":
        raise HintError("not_assistant", f"message {c.step} of {traj.id!r} is a {traj.messages[c.step].get('role')!r} message")
    if not c.quote:  # whitespace is a real error token (a raw newline inside a JSON string)
        raise HintError("no_quote", f"critique of {traj.id!r} has an empty quote")
    if not (c.hint or "").strip():
        raise HintError("no_hint", f"critique of {traj.id!r} has an empty hint")
    text = message_text(traj.messages[c.step])
    at = c.quote_at
    if at is None:  # a critique without quote_at (older files): usable only when its quote is unambiguous
        at = text.find(c.quote)
        if text.find(c.quote, at + 1) >= 0:
            raise HintError("ambiguous_quote", f"quote {c.quote[:60]!r} occurs more than once in message {c.step} "
                                               f"of {traj.id!r} and the critique has no quote_at to say which")
    if 0 <= at < prefill_length(traj, c.step):
        raise HintError("quote_in_prefill", f"quote {c.quote[:60]!r} starts inside the reply prefill of message "
                                            f"{c.step} of {traj.id!r}: those tokens were forced, not generated")


def _target(r: Rendered, step: int, quote: tuple[int, int], span: str, *, first: int = 0, seed: str = "") -> tuple[int, int]:
    """Target span in `r` for the span kind; step spans include the end-of-turn token. `random`: quote's length at a
    uniform offset in [first, end - length] (`first`: the step's first generated token), seeded by `seed`."""
    b0, end = r.body_spans[step][0], r.turn_end(step)
    if span == "random":
        n = quote[1] - quote[0]
        lo = max(first, b0)
        at = random.Random(f"random-span:{seed}").randint(lo, max(lo, end - n))
        return at, min(at + n, end)
    return {"quote": quote, "step_from_error": (quote[0], end), "step": (b0, end)}[span]


def _with_hint(traj: Trajectory, step: int, hint: str, placement: str) -> tuple[Trajectory, int]:
    """Copy of the trajectory cut after `step` with the hint placed; returns it and the step's new index."""
    msgs = [dict(m) for m in traj.messages[:step + 1]]
    if placement == "user":
        msgs.insert(step, {"role": "user", "content": hint_message_text(hint)})
        step += 1
    else:  # system
        msgs, inserted = with_system_text(msgs, hint)
        step += inserted
    return Trajectory(traj.id, msgs, traj.tools, traj.meta), step


def build_example(traj: Trajectory, critique: Critique, tokenizer, *, placement: str = "user",
                  span: str = "quote", inline_tags: tuple[str, str] = DEFAULT_INLINE_TAGS) -> HintedExample:
    """Student/teacher ids with aligned target spans for one `error` critique (see module docstring).

    Raises `HintError` (with `.reason`) when the critique cannot be built, ValueError for a bad
    `placement`/`span` combination.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, got {span!r}")
    if placement == "inline" and span == "step":
        raise ValueError("placement 'inline' puts the hint inside the step, so span 'step' cannot be aligned; "
                         "use span 'quote' or 'step_from_error'")
    _check(traj, critique)
    step = critique.step
    student_traj = Trajectory(traj.id, traj.messages[:step + 1], traj.tools, traj.meta)
    rs = render(student_traj, tokenizer)
    try:
        quote_s = rs.quote_span(step, critique.quote, at=critique.quote_at)
        # every error of the step (an all_errors critique): the target runs from the first error to the last, and
        # only the error tokens are trained (`TrainRecord.target_mask`); still one hinted sequence per example
        quote_spans = [rs.quote_span(step, e["quote"], at=e.get("quote_at")) for e in critique.errors or []]
    except ValueError as e:
        raise HintError("quote_not_found", f"{traj.id!r}: {e}") from None
    hull = (min(a for a, _ in quote_spans), max(b for _, b in quote_spans)) if quote_spans else quote_s
    forced = prefill_length(traj, step)  # the reply prefill was forced, not generated: never a random target
    first = rs.quote_span(step, message_text(traj.messages[step])[:forced], at=0)[1] if forced else 0
    s0, s1 = _target(rs, step, hull, span, first=first, seed=f"{traj.id}:{step}")
    student_ids = rs.input_ids[:s1]
    if placement == "inline":
        open_tag, close_tag = inline_tags
        ins = tokenizer(open_tag + critique.hint.strip() + close_tag, add_special_tokens=False)["input_ids"]
        at = quote_s[0]
        teacher_ids = student_ids[:at] + ins + student_ids[at:]
        t0 = s0 + len(ins)  # the target starts at the quote, which is at or after the insertion point
    else:
        hinted, t_step = _with_hint(traj, step, critique.hint, placement)
        rt = render(hinted, tokenizer)
        shift = rt.body_spans[t_step][0] - rs.body_spans[step][0]
        t0 = s0 + shift
        teacher_ids = rt.input_ids[:s1 + shift]
        ins = None
    meta = {
        "trajectory_id": traj.id, "trajectory_hash": critique.trajectory_hash, "step": step,
        "category": critique.category, "placement": placement, "span": span,
        "quote_span": list(quote_s),  # student coordinates; inside the target span for every span kind
        **({"quote_spans": [list(q) for q in quote_spans]} if len(quote_spans) > 1 else {}),  # every error's tokens
        "hint_tokens": len(teacher_ids) - len(student_ids),
    }
    try:
        return HintedExample(student_ids, teacher_ids, (s0, s1), (t0, t0 + s1 - s0), meta)
    except ValueError as e:  # the template re-tokenised the step differently with the hint present
        raise HintError("misaligned", f"{traj.id!r}: {e}") from None


def build_examples(trajectories: Iterable[Trajectory], critiques: Iterable[Critique], tokenizer,
                   **kw) -> tuple[list[HintedExample], Counter]:
    """Build one example per usable critique; the Counter says what was used and why others were skipped.

    Only critiques with verdict `error` whose `trajectory_hash` equals the trajectory's
    `content_hash()` are used (a critique without a hash is accepted, counted as `unhashed`).
    Keys: `used`, `verdict_ok`, `verdict_failed`, `no_trajectory`, `hash_mismatch`, `duplicate`,
    and one key per `HintError.reason`.
    """
    by_id = {t.id: t for t in trajectories}
    examples, counts, seen = [], Counter(), set()
    for c in critiques:
        if c.verdict != "error":
            counts[f"verdict_{c.verdict}"] += 1
            continue
        traj = by_id.get(c.trajectory_id)
        if traj is None:
            counts["no_trajectory"] += 1
            continue
        if c.trajectory_hash is None:
            counts["unhashed"] += 1
        elif c.trajectory_hash != traj.content_hash():
            counts["hash_mismatch"] += 1
            continue
        if (c.trajectory_id, c.step, c.quote) in seen:
            counts["duplicate"] += 1
            continue
        seen.add((c.trajectory_id, c.step, c.quote))
        try:
            examples.append(build_example(traj, c, tokenizer, **kw))
        except HintError as e:
            counts[e.reason] += 1
            continue
        counts["used"] += 1
    return examples, counts
