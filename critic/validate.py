"""Validation ("lint") of critiques before they are written.

Every critique goes through `check_critique`; a critique that breaks a rule comes back as
verdict `failed` with the reason (nothing is dropped, nothing raises). Rules for `error`:

- `step` is an int index of an existing message whose role is `assistant`;
- `quote` is non-empty and occurs verbatim in `opsd.render.message_text(messages[step])`:
  at char `quote_at` when the critique gives it (rule critics always do), else exactly once (an
  ambiguous quote is rejected, never guessed; the LLM critic is re-asked with the reason);
- the quote starts at or after the forced reply prefill of the step
  (`opsd.render.prefill_length`): it covers only tokens the model generated;
- `hint` is non-empty and at most `max_hint_tokens` tokens (approximate count, see
  `approx_tokens`);
- the hint does not contain the quoted erroneous text: the quote's core (surrounding
  whitespace and JSON punctuation stripped) must not appear in the hint as a whole word,
  case-insensitively. A hint that repeats the wrong token makes the model copy it
  (FINDINGS.md: +0.55 on the error token instead of -1.14).

`ok` critiques must not carry a step/quote; `failed` ones must say why. A valid `error` critique
comes back with `quote_at` filled in.
"""
from __future__ import annotations

import dataclasses
import re

from opsd.render import message_text, prefill_length
from opsd.types import Critique, Trajectory

DEFAULT_MAX_HINT_TOKENS = 64
_CORE_STRIP = " \t\r\n\"'`{}[]():,;<>"
_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def approx_tokens(text: str) -> int:
    """Approximate BPE token count: words count ~1.3 tokens, punctuation marks 1 each."""
    words = punct = 0
    for t in _TOKEN_RE.findall(text):
        if t[0].isalnum() or t[0] == "_":
            words += 1 + len(t) // 8  # long identifiers split into several tokens
        else:
            punct += 1
    return int(words * 1.3 + punct + 0.999)


def quote_core(quote: str) -> str:
    """The quote without surrounding whitespace, quotes and JSON punctuation ('"rate"' -> 'rate')."""
    return quote.strip(_CORE_STRIP)


def hint_repeats_quote(hint: str, quote: str) -> bool:
    """True if the quote's core appears in the hint as a whole word, with the same case.

    Case-sensitive on purpose: the harm is the teacher copying the wrong *tokens*, and a name
    that differs only in case is other tokens; for a case-only mistake
    (`Calculate_Final_Temperature`) the right hint must name `calculate_final_temperature`.
    """
    core = quote_core(quote)
    if not core:
        return False
    h = hint
    # whole-word match: the core is not glued to further word characters on either side
    # dotted names are one word: "gcd" inside the correct "number_theory.gcd" is not a repeat,
    # but a sentence-final period still ends a word ("Do not call gcd.")
    pat = (r"(?<![\w.])" if core[0].isalnum() or core[0] == "_" else "") + re.escape(core) + \
          (r"(?!\w|\.\w)" if core[-1].isalnum() or core[-1] == "_" else "")
    return re.search(pat, h) is not None


def lint_hint(hint: str | None, quote: str | None, *, max_hint_tokens: int = DEFAULT_MAX_HINT_TOKENS) -> str | None:
    """Reason the hint is unusable, or None if it is fine."""
    if not isinstance(hint, str) or not hint.strip():
        return "hint is empty"
    n = approx_tokens(hint)
    if n > max_hint_tokens:
        return f"hint is too long: about {n} tokens > limit {max_hint_tokens}"
    if quote and hint_repeats_quote(hint, quote):
        return f"hint repeats the erroneous text {quote_core(quote)!r} (a model copies it)"
    return None


def problem(c: Critique, traj: Trajectory, *, max_hint_tokens: int = DEFAULT_MAX_HINT_TOKENS) -> str | None:
    """The first rule `c` breaks for `traj`, or None if it is valid."""
    if c.verdict == "failed":
        return None if c.error else "failed critique has no error reason"
    if c.verdict == "ok":
        if c.step is not None or c.quote or c.quote_at is not None:
            return "an 'ok' critique must not point to a step or quote"
        return None
    step = c.step
    if isinstance(step, bool) or not isinstance(step, int):
        return f"step must be an integer message index, got {step!r}"
    n = len(traj.messages)
    if not 0 <= step < n:
        return f"step {step} is out of range: the trajectory has {n} messages (0..{n - 1})"
    role = traj.messages[step].get("role")
    if role != "assistant":
        return f"step {step} is a {role!r} message, not an assistant message"
    if not isinstance(c.quote, str) or not c.quote:
        return "quote is empty"
    text = message_text(traj.messages[step])
    at = locate_quote(c.quote, c.quote_at, text, step)
    if isinstance(at, str):
        return at
    forced = prefill_length(traj, step)
    if at < forced:
        return (f"quote starts inside the forced reply prefill {text[:forced]!r} of message {step} (chars 0-{forced - 1}); "
                "quote only text the model generated")
    if c.category is not None and not isinstance(c.category, str):
        return f"category must be a string, got {type(c.category).__name__}"
    if c.errors is not None:
        return errors_problem(c, text, step, forced, max_hint_tokens=max_hint_tokens)
    return lint_hint(c.hint, c.quote, max_hint_tokens=max_hint_tokens)


def errors_problem(c: Critique, text: str, step: int, forced: int, *, max_hint_tokens: int) -> str | None:
    """The first rule a several-error critique breaks: `errors` is a list of >= 2 entries {"quote", "quote_at",
    "category", "hint"} in text order that do not overlap, the first being the critique's own quote; each quote is
    generated text of the step; the hint (one part per error, each within the budget) repeats none of them."""
    errs = c.errors
    if not isinstance(errs, list) or len(errs) < 2 or not all(isinstance(e, dict) for e in errs):
        return "errors must be a list of at least 2 objects (leave it out for a single error)"
    if (errs[0].get("quote"), errs[0].get("quote_at")) != (c.quote, c.quote_at):
        return "errors[0] must be the critique's own quote and quote_at"
    end = -1
    for i, e in enumerate(errs):
        if not isinstance(e.get("quote"), str) or not e["quote"]:
            return f"errors[{i}].quote is empty"
        at = locate_quote(e["quote"], e.get("quote_at"), text, step)
        if isinstance(at, str):
            return f"errors[{i}]: {at}"
        if at < forced:
            return f"errors[{i}]: quote starts inside the forced reply prefill of message {step}"
        if at < end:
            return f"errors[{i}] overlaps or precedes the error before it (list errors in text order, apart)"
        end = at + len(e["quote"])
        if not isinstance(e.get("hint"), str) or lint_hint(e["hint"], e["quote"], max_hint_tokens=max_hint_tokens):
            return f"errors[{i}].hint: {lint_hint(e.get('hint'), e['quote'], max_hint_tokens=max_hint_tokens)}"
    for e in errs:
        why = lint_hint(c.hint, e["quote"], max_hint_tokens=max_hint_tokens * len(errs))
        if why:
            return why
    return None


def occurrences(quote: str, text: str) -> list[int]:
    """Start offsets of every occurrence of `quote` in `text`, overlapping ones included."""
    out, a = [], text.find(quote)
    while a >= 0:
        out.append(a)
        a = text.find(quote, a + 1)
    return out


def _shown(quote: str) -> str:
    return repr(quote[:80])


def locate_quote(quote: str, quote_at, text: str, step: int) -> int | str:
    """The quote's offset in `text`, or the reason (a str) when it is not there or is ambiguous."""
    if quote_at is not None:
        if isinstance(quote_at, bool) or not isinstance(quote_at, int):
            return f"quote_at must be an integer char offset or null, got {quote_at!r}"
        if quote_at < 0 or text[quote_at:quote_at + len(quote)] != quote:
            return f"quote {_shown(quote)} is not at char {quote_at} of message {step}"
        return quote_at
    hits = occurrences(quote, text)
    if not hits:
        return f"quote {_shown(quote)} does not occur verbatim in message {step}"
    if len(hits) > 1:
        return (f"quote {_shown(quote)} occurs {len(hits)} times in message {step}; quote a longer part of the "
                "message that occurs only once")
    return hits[0]


def check_critique(c: Critique, traj: Trajectory, *, max_hint_tokens: int = DEFAULT_MAX_HINT_TOKENS) -> Critique:
    """`c` if it is valid, else a `failed` copy carrying the reason (and what was proposed)."""
    reason = problem(c, traj, max_hint_tokens=max_hint_tokens)
    if reason is None:
        if c.verdict == "error" and c.quote_at is None:  # unique: validated above
            return dataclasses.replace(c, quote_at=occurrences(c.quote, message_text(traj.messages[c.step]))[0])
        return c
    return dataclasses.replace(c, verdict="failed", error=f"invalid critique: {reason}")
