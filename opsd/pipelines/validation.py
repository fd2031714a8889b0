"""A model's outcome on the validation tasks, and the one order `opsd loop` and `opsd compare` rank models by.

    from opsd.pipelines.validation import summarise_validation
    v = summarise_validation(trajs, crits)     # single-turn replies or multi-turn episodes
    v.better_than(best)                        # accuracy, right function in a parseable call, parseable, errors

Every rate is over all n replies (or episodes); a reply whose check crashed, a reply with no call and a
missing critique of an episode count as errors. See `Validation.better_than` for why a model whose calls
stopped parsing cannot win.
"""
from __future__ import annotations

from dataclasses import dataclass

from opsd.critique.outcomes import reply_outcomes
from opsd.eval import stats
from opsd.eval.metrics import HEADLINE, reply_outcome
from opsd.eval.multi_turn import episode_outcome
from opsd.io.tasks import bfcl_multi_turn as mt
from opsd.types import Critique, Trajectory


@dataclass
class Validation:
    """One model's outcome on the validation tasks (every rate over all n replies or episodes)."""

    n: int
    accuracy: float  # official BFCL AST checker
    error_rate: float  # replies with an error, no call, or a crashed check (schema + reference, whole reply)
    undeclared_name: float  # replies naming an undeclared tool
    accuracy_ci: tuple[float, float]
    error_rate_ci: tuple[float, float]
    gt_function: float = 0.0  # replies whose first committed name is the ground truth's function
    parseable: float = 0.0  # replies whose calls all parse (episodes: at least one call, every call parsed)
    gt_function_parseable: float = 0.0  # parseable replies that name the ground truth's function
    not_checked: float = 0.0  # replies whose check crashed (also counted in error_rate)

    def key(self) -> tuple[float, float, float, float]:
        return (self.accuracy, self.gt_function_parseable, self.parseable, -self.error_rate)

    def better_than(self, other: "Validation") -> bool:
        """Lexicographic, higher is better: accuracy; replies with a parseable call that names the ground-truth
        function; parseable replies; fewer replies with an error.

        A model whose calls stopped parsing cannot win: accuracy needs a parseable correct call, the second key
        counts the right function only inside calls that parse, and the third counts parseable replies, so
        breaking calls lowers every key before the error rate is read; only two equally broken models are told
        apart by their errors (which count a reply without a call, or with a crashed check, as an error).
        Why the second key: a student still at 0 accuracy makes progress by naming the right function (the
        demo's 2-round run on 2026-11-24 left accuracy 0 and errors in 100% of replies in every round; ranked
        on errors alone the base was kept over rounds that cut undeclared names from 72% to 2%). Why only in
        parseable calls: `opsd compare` on 2026-11-24 picked lr 1e-4 for `opsd` on right function 0.844
        against 0.719 (both accuracy 0, errors 100%), and that model's held-out calls were 100% unparseable."""
        return self.key() > other.key()

    def worse_than(self, other: "Validation") -> bool:
        return other.better_than(self)


def summarise_validation(trajs: list[Trajectory], crits: list[Critique]) -> Validation:
    if trajs and all(mt.is_multi_turn(t.meta) for t in trajs):
        return summarise_episodes(trajs, crits)
    by_id = {c.trajectory_id: c for c in crits}
    outcomes = [reply_outcome(t, by_id.get(t.id), reply_outcomes) for t in trajs]
    n = len(outcomes)
    acc = sum(HEADLINE["official_accuracy"][1](o) for o in outcomes)
    err = sum(o["rows"]["n_errors"] != "0" for o in outcomes)  # a crashed check (not_checked) is an error
    und = sum(HEADLINE["names_undeclared_tool"][1](o) for o in outcomes)
    gt = sum(HEADLINE["names_gt_function"][1](o) for o in outcomes)
    ok = [not HEADLINE["no_parseable_call"][1](o) for o in outcomes]
    gtp = sum(k and HEADLINE["names_gt_function"][1](o) for k, o in zip(ok, outcomes))
    unchecked = sum(o["rows"]["n_errors"] == "not_checked" for o in outcomes)
    return Validation(n, acc / max(n, 1), err / max(n, 1), und / max(n, 1), stats.wilson(acc, n), stats.wilson(err, n),
                      gt / max(n, 1), sum(ok) / max(n, 1), gtp / max(n, 1), unchecked / max(n, 1))


def summarise_episodes(trajs: list[Trajectory], crits: list[Critique]) -> Validation:
    """Multi-turn episodes: accuracy = BFCL's official multi-turn checker; an error = the critic found one or gave
    no verdict (a failed or missing critique: not_checked); an undeclared name = some reply calls a tool the
    episode never declared; the ground-truth function = the episode's first call names a function of the first
    turn's ground truth; parseable = the episode made a call and every reply's calls parsed."""
    by_id = {c.trajectory_id: c for c in crits}
    n = len(trajs)
    acc = err = und = gt = ok = gtp = unchecked = 0
    for t in trajs:
        o = episode_outcome(t, by_id.get(t.id))
        info = t.meta["multi_turn"]
        declared = {(x.get("function") or x).get("name") for x in
                    [*t.tools, *(f for fs in (info.get("added_tools") or {}).values() for f in fs)]}
        names = [(c.get("function") or {}).get("name") for m in t.messages if m.get("role") == "assistant"
                 for c in m.get("tool_calls") or []]
        first_gt = {s.split("(", 1)[0] for s in (info.get("ground_truth") or [[]])[0]}
        parsed = bool(names) and not any(m.get("parse_error") for m in t.messages if m.get("role") == "assistant")
        right = bool(names) and names[0] in first_gt
        acc += o["valid"]
        err += o["critic"] != "ok"
        unchecked += o["critic"] not in ("ok", "error")
        und += any(x not in declared for x in names)
        gt += right
        ok += parsed
        gtp += parsed and right
    return Validation(n, acc / max(n, 1), err / max(n, 1), und / max(n, 1), stats.wilson(acc, n), stats.wilson(err, n),
                      gt / max(n, 1), ok / max(n, 1), gtp / max(n, 1), unchecked / max(n, 1))
