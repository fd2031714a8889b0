"""Critics: find the erroneous step of a trajectory, quote the error verbatim, write a hint.

    from opsd_critic import make_critic, run_critiques, format_summary
    critic = make_critic("schema+reference")
    print(format_summary(run_critiques(trajectories, critic, "critiques.jsonl")))

Protocol (`Critic`): `name`, `config()` (JSON, no secrets), `info` = {"name", "config_hash"},
`max_hint_tokens`, `async critique(traj) -> opsd.types.Critique`, `async aclose()`.
Critics available:

- `schema`: each tool call against the trajectory's tool schemas (`opsd_critic.schema`);
- `reference`: the reply against `meta.ground_truth`, with BFCL possible-answer semantics
  (`opsd_critic.reference`); several replies, and BFCL multi-turn episodes replayed in their simulated
  environments, reply by reply: the first wrong one (`opsd_critic.multi_turn`);
- `llm`: any OpenAI-compatible endpoint (`opsd_critic.llm`);
- `schema+reference`: schema first; the reference critic only when the schema critic says ok
  (and the trajectory has ground truth);
- `schema+llm`: the LLM critic decides, and the schema critic cross-checks every `ok`: when it
  finds an error the LLM missed, its finding wins and `Critique.disagreement` records that the
  LLM's `ok` was overruled.

Every critique is validated before it is written (`opsd_critic.validate`); an invalid one becomes
verdict `failed` with the reason. `opsd` core never imports this package; `opsd.critique` (the
one `CriticConfig`, `build_critic`, `main`) composes the two.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from opsd_critic.base import (
    DEFAULT_MAX_ERRORS,
    REFERENCE_CATEGORIES,
    SCHEMA_CATEGORIES,
    BaseCritic,
    CriticFatalError,
    RuleCritic,
)
from opsd_critic.llm_config import LLMConfig
from opsd_critic.reference import ReferenceCritic
from opsd_critic.runner import RunSummary, format_summary, run_critiques, run_critiques_async
from opsd_critic.schema import SchemaCritic
from opsd_critic.validate import DEFAULT_MAX_HINT_TOKENS, check_critique, lint_hint
from opsd.types import Critique, Trajectory

CRITICS = ("schema", "reference", "llm", "schema+reference", "schema+llm")


@runtime_checkable
class Critic(Protocol):
    name: str
    max_hint_tokens: int

    def config(self) -> dict: ...

    @property
    def info(self) -> dict: ...

    async def critique(self, traj: Trajectory) -> Critique: ...

    async def aclose(self) -> None: ...


class ChainCritic(BaseCritic):
    """`first` decides unless it says ok; then `second` decides (e.g. schema, then reference).

    When `second` cannot apply to a trajectory (`second.applies(traj)` is False, e.g. no ground
    truth for the reference critic), the `ok` of `first` stands.
    """

    def __init__(self, first: BaseCritic, second: BaseCritic):
        super().__init__(max_hint_tokens=min(first.max_hint_tokens, second.max_hint_tokens),
                         all_errors=first.all_errors and second.all_errors, max_errors=first.max_errors)
        self.first, self.second = first, second
        self.name = f"{first.name}+{second.name}"

    def config(self) -> dict:
        return {"first": self.first.info, "second": self.second.info}

    async def critique(self, traj: Trajectory) -> Critique:
        subsumed = getattr(self.second, "subsumes", lambda t: False)(traj)  # multi-turn: `second` checks every step
        c = await (self.second if subsumed else self.first).critique(traj)
        applies = not subsumed and getattr(self.second, "applies", lambda t: True)(traj)
        if applies and c.verdict == "ok":
            c = await self.second.critique(traj)
        elif applies and c.verdict == "error" and self.all_errors:  # every error of the step, from both critics
            c2 = await self.second.critique(traj)
            if c2.verdict == "error" and c2.step == c.step:
                c = self.errors_at(traj, c.step, _entries(c) + _entries(c2))
        c.critic = self.info
        return c

    async def aclose(self) -> None:
        await self.first.aclose()
        await self.second.aclose()

    def secrets(self) -> list[str]:
        return self.first.secrets() + self.second.secrets()

    def preflight(self, traj: Trajectory) -> None:
        for c in (self.first, self.second):
            if hasattr(c, "preflight"):
                c.preflight(traj)


def _entries(c: Critique) -> list[dict]:
    """The errors of an `error` critique as `errors` entries (a one-error critique gives one)."""
    return list(c.errors or [{"quote": c.quote, "quote_at": c.quote_at, "category": c.category, "hint": c.hint}])


class CrossCheckCritic(ChainCritic):
    """`primary` (an LLM) decides; `check` (a rule critic) cross-checks every `ok` of it.

    When the rule critic finds an error in a trajectory the primary called ok, the rule finding
    wins, carrying the primary's usage and `disagreement = {"overruled": {"name", "verdict": "ok"},
    "by": <rule critic>}`. An `error` or `failed` of the primary stands.
    """

    def __init__(self, primary: BaseCritic, check: BaseCritic):
        super().__init__(primary, check)
        self.name = f"{check.name}+{primary.name}"

    async def critique(self, traj: Trajectory) -> Critique:
        c = await self.first.critique(traj)
        if c.verdict == "ok":
            rule = await self.second.critique(traj)
            if rule.verdict == "error":
                rule.usage = c.usage
                rule.replies = getattr(c, "replies", None)  # the overruled LLM's raw replies stay in the record
                rule.disagreement = {"overruled": {"name": self.first.name, "verdict": "ok"}, "by": self.second.name}
                c = rule
        c.critic = self.info
        return c


def make_critic(name: str, *, max_hint_tokens: int = DEFAULT_MAX_HINT_TOKENS, llm_config=None,
                all_errors: bool = False, max_errors: int = DEFAULT_MAX_ERRORS) -> BaseCritic:
    """Build a critic by name (one of `CRITICS`). `llm_config` (opsd_critic.llm.LLMConfig) is needed for "llm".
    `all_errors`: the rule critics report every error of the erroneous step (at most `max_errors`), not the first."""
    rule = {"max_hint_tokens": max_hint_tokens, "all_errors": all_errors, "max_errors": max_errors}
    if name == "schema":
        return SchemaCritic(**rule)
    if name == "reference":
        return ReferenceCritic(**rule)
    if name == "schema+reference":
        return ChainCritic(SchemaCritic(**rule), ReferenceCritic(**rule))
    if name in ("llm", "schema+llm"):
        from opsd_critic.llm import LLMCritic  # openai: see __getattr__

        if llm_config is None:
            raise ValueError(f"the {name} critic needs an LLMConfig (base_url, model, ...)")
        if name == "llm":
            return LLMCritic(llm_config)
        return CrossCheckCritic(LLMCritic(llm_config), SchemaCritic(**rule))
    raise ValueError(f"unknown critic {name!r}; choose from {', '.join(CRITICS)}")


def __getattr__(name: str):  # opsd_critic.llm imports openai (0.6 s): only when an LLM critic is asked for
    if name == "LLMCritic":
        from opsd_critic import llm

        return llm.LLMCritic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Critic", "BaseCritic", "RuleCritic", "ChainCritic", "CrossCheckCritic", "SchemaCritic", "ReferenceCritic", "LLMCritic",
           "LLMConfig", "CriticFatalError", "make_critic", "check_critique", "lint_hint", "run_critiques",
           "run_critiques_async", "format_summary", "RunSummary", "CRITICS", "SCHEMA_CATEGORIES",
           "REFERENCE_CATEGORIES"]
