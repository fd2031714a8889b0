"""Shared pieces of the critics: the base class, config hashing, hint templates.

A critic has a `name`, a JSON-serialisable `config()` (what determines its output; never a
secret), and `async critique(traj) -> Critique`. `info` = {"name", "config_hash"} goes into
every record; the record key is f"{trajectory_hash}:{config_hash}".
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import jinja2

import prompts
from critic.validate import DEFAULT_MAX_HINT_TOKENS, lint_hint
from opsd.types import Critique, Trajectory, content_hash

# bump when a rule critic's logic changes, so cached critiques are recomputed
RULES_VERSION = 1

SCHEMA_CATEGORIES = ("unknown_tool", "invalid_json", "unparsable_call", "missing_required", "unknown_parameter",
                     "type_mismatch", "enum_violation", "constraint_violation", "tool_error")
REFERENCE_CATEGORIES = ("wrong_function", "wrong_value", "missing_call", "extra_call")


class CriticFatalError(RuntimeError):
    """A configuration problem (bad key, unknown model or URL) that would fail every trajectory."""


class BaseCritic:
    """Base for critics. Subclasses set `name`, implement `config()` and `critique()`."""

    name = "base"

    def __init__(self, *, max_hint_tokens: int = DEFAULT_MAX_HINT_TOKENS):
        if max_hint_tokens < 1:
            raise ValueError(f"max_hint_tokens must be >= 1, got {max_hint_tokens}")
        self.max_hint_tokens = max_hint_tokens

    def config(self) -> dict:
        return {"max_hint_tokens": self.max_hint_tokens}

    @property
    def info(self) -> dict:
        return {"name": self.name, "config_hash": content_hash({"name": self.name, **self.config()})}

    async def critique(self, traj: Trajectory) -> Critique:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release resources (HTTP clients)."""

    # helpers for subclasses
    def ok(self, traj: Trajectory) -> Critique:
        return Critique(traj.id, "ok", critic=self.info, trajectory_hash=traj.content_hash())

    def error(self, traj: Trajectory, step: int, quote: str, hint: str, category: str) -> Critique:
        return Critique(traj.id, "error", step=step, quote=quote, hint=hint, category=category, critic=self.info,
                        trajectory_hash=traj.content_hash())

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
        description); if none passes, the last is returned and validation records the failure.
        """
        text = ""
        for v in variants or ({},):
            text = render_hint(category, **v)
            if lint_hint(text, quote, max_hint_tokens=self.max_hint_tokens) is None:
                return text
        return text


@lru_cache(maxsize=None)
def _env() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


@lru_cache(maxsize=None)
def _hint_template(category: str) -> jinja2.Template:
    try:
        src = prompts.read(f"hints/{category}.j2")
    except FileNotFoundError:
        raise ValueError(f"no hint template prompts/hints/{category}.j2") from None
    return _env().from_string(src)


def render_hint(category: str, **variables) -> str:
    """Render the hint template of `category` (StrictUndefined: a missing variable raises)."""
    return " ".join(_hint_template(category).render(**variables).split())


@lru_cache(maxsize=None)
def hint_templates_hash() -> str:
    h = hashlib.sha256()
    d = prompts.path("hints")
    for p in sorted(d.glob("*.j2")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]
