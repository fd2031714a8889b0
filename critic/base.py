"""Shared pieces of the critics: the base class, config hashing, hint templates.

A critic has a `name`, a JSON-serialisable `config()` (what determines its output; never a
secret), and `async critique(traj) -> Critique`. `info` = {"name", "config_hash"} goes into
every record; the record key is f"{trajectory_hash}:{config_hash}".
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import jinja2

import opsd_prompts
from opsd_critic.calls import in_generated
from opsd_critic.validate import DEFAULT_MAX_HINT_TOKENS, hint_repeats_quote, lint_hint
from opsd.types import Critique, StageError, Trajectory, content_hash

# bump when a rule critic's logic changes, so cached critiques are recomputed
RULES_VERSION = 6  # 6: schema: repeated_call and made_up_value; 5: a call that never parsed is checked inside its arguments (schema echo -> unknown_parameter); 2: exact error tokens, quote_at, the reply prefill is never quoted; 3: reply by reply (multi-turn); 4: multi-turn unknown_tool hints name the next ground-truth call

SCHEMA_CATEGORIES = ("unknown_tool", "invalid_json", "unparsable_call", "missing_required", "unknown_parameter",
                     "type_mismatch", "enum_violation", "constraint_violation", "tool_error")
REFERENCE_CATEGORIES = ("wrong_function", "wrong_value", "missing_call", "extra_call")


MIN_RULE_HINT_TOKENS = 9  # the longer fallback hint; rule critics need at least this budget
DEFAULT_MAX_ERRORS = 3  # all_errors: the errors of one step a critique carries at most (one hint sentence each)


def combine_errors(errors: list[dict], *, max_errors: int = DEFAULT_MAX_ERRORS) -> tuple[list[dict], str]:
    """Every error of one step as one critique: the errors (each {"quote", "quote_at", "category", "hint"}) that
    do not overlap an earlier one, in text order, at most `max_errors`, and the hint that states each fix.

    An error whose quote the hint of another kept error would repeat is left out (the teacher would copy it),
    so the combined hint passes the lint against every kept quote; each part obeys the one-hint budget.
    """
    kept: list[dict] = []
    for e in sorted(errors, key=lambda e: e["quote_at"]):
        if len(kept) == max_errors:
            break
        if kept and e["quote_at"] < kept[-1]["quote_at"] + len(kept[-1]["quote"]):
            continue  # overlaps the previous error: that error's tokens are already targeted
        if any(e["hint"] == k["hint"] for k in kept):
            continue  # the same fix, said once
        trial = kept + [e]
        if any(hint_repeats_quote(x["hint"], y["quote"]) for x in trial for y in trial):
            continue
        kept = trial
    return kept, " ".join(k["hint"].strip() for k in kept)


class CriticFatalError(StageError):
    """A configuration problem (bad key, unknown model or URL) that would fail every trajectory."""


class BaseCritic:
    """Base for critics. Subclasses set `name`, implement `config()` and `critique()`."""

    name = "base"

    def __init__(self, *, max_hint_tokens: int = DEFAULT_MAX_HINT_TOKENS, all_errors: bool = False,
                 max_errors: int = DEFAULT_MAX_ERRORS):
        if max_hint_tokens < 1:
            raise ValueError(f"max_hint_tokens must be >= 1, got {max_hint_tokens}")
        if max_errors < 1:
            raise ValueError(f"max_errors must be >= 1, got {max_errors}")
        self.max_hint_tokens = max_hint_tokens
        self.all_errors, self.max_errors = all_errors, max_errors  # every error of the erroneous step, not the first

    def config(self) -> dict:
        multi = {"all_errors": True, "max_errors": self.max_errors} if self.all_errors else {}
        return {"max_hint_tokens": self.max_hint_tokens, **multi}

    @property
    def info(self) -> dict:
        return {"name": self.name, "config_hash": content_hash({"name": self.name, **self.config()})}

    async def critique(self, traj: Trajectory) -> Critique:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release resources (HTTP clients)."""

    def secrets(self) -> list[str]:
        """Values that must never be printed or logged (API keys); the runner redacts them from logs."""
        return []

    # helpers for subclasses
    def ok(self, traj: Trajectory) -> Critique:
        return Critique(traj.id, "ok", critic=self.info, trajectory_hash=traj.content_hash())

    def error(self, traj: Trajectory, step: int, quote: str, hint: str, category: str,
              quote_at: int | None = None, errors: list[dict] | None = None) -> Critique:
        return Critique(traj.id, "error", step=step, quote=quote, hint=hint, category=category, critic=self.info,
                        trajectory_hash=traj.content_hash(), quote_at=quote_at, errors=errors)

    def errors_at(self, traj: Trajectory, step: int, errors: list[dict]) -> Critique:
        """One `error` critique for several errors of message `step` (`combine_errors`): the first error is the
        critique's quote and category, `errors` lists them all, and the hint states every fix."""
        kept, hint = combine_errors(errors, max_errors=self.max_errors)
        first = kept[0]
        return self.error(traj, step, first["quote"], hint, first["category"], quote_at=first["quote_at"],
                          errors=kept if len(kept) > 1 else None)

    def failed(self, traj: Trajectory, reason: str) -> Critique:
        return Critique(traj.id, "failed", critic=self.info, error=reason, trajectory_hash=traj.content_hash())


class RuleCritic(BaseCritic):
    """A critic computed by rules; `check(traj)` is synchronous."""

    def config(self) -> dict:
        return {**super().config(), "rules_version": RULES_VERSION, "hint_templates": hint_templates_hash()}

    def check(self, traj: Trajectory) -> Critique:
        raise NotImplementedError

    async def critique(self, traj: Trajectory) -> Critique:
        return self.check(traj)

    def hint(self, category: str, quote: str, *variants: dict) -> str:
        """Render `prompts/hints/<category>.j2` with the first variant whose hint passes the lint.

        Variants go from most to least informative (e.g. with and without the parameter
        description). When none passes (its text would repeat the quote, or it is too long),
        `prompts/hints/fallback.j2` gives a generic hint; its two variants share no word, so one
        passes for any quote within a budget of `MIN_RULE_HINT_TOKENS`.
        """
        candidates = [("", v) for v in variants or ({},)] + [("fallback", {"variant": k}) for k in (0, 1)]
        text = ""
        for which, v in candidates:
            text = render_hint(which or category, **v)
            if lint_hint(text, quote, max_hint_tokens=self.max_hint_tokens) is None:
                return text
        return text

    def first_error(self, traj: Trajectory, step: int, text: str, start: int, issues: list,
                    priority: dict[str, int] | None = None) -> Critique:
        """The critique of the issue whose quote starts first in the generated text (ties: `priority`).

        `issues` have `.span` (None: nothing to quote), `.category` and `.hint_vars`; spans are cut
        to the generated text (from `start`, the end of the reply prefill). A step that is wrong
        but has no generated text to quote is `failed` with the reason, never a bad quote.
        """
        located = [(sp, iss) for iss in issues if (sp := in_generated(iss.span, start)) is not None]
        if not located:
            return self.failed(traj, f"message {step} is wrong but holds no generated text to quote: the model "
                                     f"generated nothing after its reply prefill {text[:start]!r}")
        located.sort(key=lambda x: (x[0][0], (priority or {}).get(x[1].category, 99)))
        if self.all_errors:
            return self.errors_at(traj, step, [self.error_entry(text, sp, iss.category, iss.hint_vars)
                                               for sp, iss in located])
        span, iss = located[0]
        return self.error_at(traj, step, text, span, iss.category, iss.hint_vars)

    def error_entry(self, text: str, span: tuple[int, int], category: str, hint_vars: list[dict]) -> dict:
        """One error of a step as an `errors` entry: its quote, where it is, its category and its own hint."""
        quote = text[span[0]:span[1]]
        return {"quote": quote, "quote_at": span[0], "category": category,
                "hint": self.hint(category, quote, *hint_vars)}

    def error_at(self, traj: Trajectory, step: int, text: str, span: tuple[int, int], category: str,
                 hint_vars: list[dict]) -> Critique:
        """An `error` critique quoting `text[span[0]:span[1]]` at `quote_at=span[0]`."""
        quote = text[span[0]:span[1]]
        return self.error(traj, step, quote, self.hint(category, quote, *hint_vars), category, quote_at=span[0])


@lru_cache(maxsize=None)
def _env() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


@lru_cache(maxsize=None)
def _hint_template(category: str) -> jinja2.Template:
    try:
        src = opsd_prompts.read(f"hints/{category}.j2")
    except FileNotFoundError:
        raise ValueError(f"no hint template prompts/hints/{category}.j2") from None
    return _env().from_string(src)


def render_hint(category: str, **variables) -> str:
    """Render the hint template of `category` (StrictUndefined: a missing variable raises)."""
    return " ".join(_hint_template(category).render(**variables).split())


@lru_cache(maxsize=None)
def hint_templates_hash() -> str:
    h = hashlib.sha256()
    d = opsd_prompts.path("hints")
    for p in sorted(d.glob("*.j2")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]
