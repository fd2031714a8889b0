"""Reference critique of a BFCL multi-turn episode: the FIRST erroneous step, whichever turn holds it.

`ReferenceCritic` (and `schema+reference`) send every trajectory whose `meta.multi_turn` names a
BFCL multi-turn task here. The environment and the ground truth come from the installed wheel by
`meta.multi_turn.bfcl_id`; the trajectory's calls are replayed in BFCL's simulated classes only
(`opsd.io.tasks.bfcl_env`: no `eval`, nothing outside the simulation), next to the ground truth.

Turn by turn, each assistant step is read in order; the first step with one of these is the error:

| category                | when                                                          | quote                      |
|-------------------------|---------------------------------------------------------------|----------------------------|
| schema categories       | a call that does not parse, an unknown (or not yet available) | as the schema critic       |
|                         | function, a missing required argument, a wrong type, ...      |                            |
| wrong_function /        | a call that changes the environment state, or fails, and is   | the name / the value / the |
| wrong_value / missing_required / unknown_parameter | not one of the turn's pending ground-truth calls (compared with the pending call of the same name, else the first pending one) | key / the closing `}` |
| tool_error              | a call that fails when no ground-truth call is pending        | the value the error names, |
|                         |                                                               | else the arguments         |
| repeated_call           | the same call again, after the tool already returned its      | the `<tool_call>` tag the  |
|                         | answer (same result, no state change)                         | model wrote, else the name |
| extra_call              | a call in a turn whose ground truth is empty (BFCL's          | same as repeated_call      |
|                         | miss_param / miss_func turns: the model should not call)      |                            |
| missing_call            | the turn ended with ground-truth calls still pending          | the first line of the text |
|                         |                                                               | reply that ended the turn  |

A call is "one of the pending ground-truth calls" when it calls the same function and running it
gives the same result and the same state as running that ground-truth call would (so
`cd(folder="a/")` may match `cd(folder='a')` if the simulation treats them alike). A call that neither changes the state nor fails (a look
around, e.g. `ls`) is not an error by itself; but when the turn then ends with ground-truth calls
pending, the first such call made after the last matched one is blamed (it should have been the
pending call), else the reply that ended the turn.

At the end of each turn with ground truth, BFCL's own `state_checker` and `response_checker`
(`bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker`) must agree; if they do not while no
step was found wrong, the critique is `failed` with their message, never a guessed step. So is an
episode that was cut short (step cap, time, context) with no wrong step in the turns it played.
This critic is stricter than BFCL's checker: repeated and failing calls are errors even where
BFCL accepts the episode.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass

from opsd_critic.calls import (
    CallBlock,
    OPEN,
    extract_calls,
    name_span,
    render_value,
    string_content_span,
)
from opsd_critic.matching import Problem, match_calls, missing_call_span, parse_ground_truth, reply_problems
from opsd_critic.conversation import tool_result_error
from opsd_critic.schema import call_issues, closing_span, key_name_span, tools_by_name
from opsd.io.tasks import bfcl
from opsd.io.tasks import bfcl_multi_turn as mt
from opsd.io.tasks.bfcl_env import ERROR_PREFIX, Environment
from opsd.render import message_text, prefill_length
from opsd.types import Critique, Trajectory

_PRIORITY = {c: k for k, c in enumerate(("unparsable_call", "invalid_json", "unknown_tool", "unknown_parameter",
                                          "type_mismatch", "enum_violation", "constraint_violation",
                                          "missing_required"))}


def is_multi_turn(traj: Trajectory) -> bool:
    return mt.is_multi_turn(traj.meta)


def turn_spans(traj: Trajectory, n_turns: int) -> list[tuple[int, int]]:
    """[start, end) message ranges of the turns played (`opsd.io.tasks.bfcl_multi_turn.turn_starts`)."""
    starts = mt.turn_starts(traj.messages, traj.meta)
    if len(starts) > n_turns:
        raise ValueError(f"the trajectory has {len(starts)} user turns but the BFCL task has {n_turns}")
    return list(zip(starts, starts[1:] + [len(traj.messages)]))


@dataclass
class _Call:
    step: int
    blk: CallBlock
    name: str
    args: dict
    result: str


def _is_failure(result: str) -> bool:
    return result.startswith(ERROR_PREFIX) or tool_result_error(result) is not None


def _tag_or_name(blk: CallBlock, start: int) -> tuple[int, int]:
    """The decision to call at all: the `<tool_call>` tag when the model wrote it, else the name."""
    return (blk.start, blk.start + len(OPEN)) if blk.start >= start else name_span(blk)


def _arg_problems(blk: CallBlock, gt_name: str, gt_args: dict, defaults: dict) -> list[Problem]:
    """How a call of `gt_name` differs from the ground-truth call's arguments (exact values)."""
    out: list[Problem] = []
    fields = blk.args.fields if blk.args is not None and blk.args.is_object else {}
    for key, f in fields.items():
        if key in gt_args:
            if f.value.value != gt_args[key]:
                span = string_content_span(f.value) if isinstance(gt_args[key], str) else (f.value.start, f.value.end)
                out.append(Problem("wrong_value", span, [{"function": gt_name, "parameter": key,
                                                          "expected": render_value(gt_args[key])},
                                                         {"function": gt_name, "parameter": key, "expected": ""}]))
        elif key not in defaults or f.value.value != defaults[key]:
            valid = list(gt_args)
            out.append(Problem("unknown_parameter", key_name_span(f), [{"function": gt_name, "valid_parameters": valid},
                                                                       {"function": gt_name, "valid_parameters": []}]))
    for key, v in gt_args.items():
        if key not in fields and not (key in defaults and defaults[key] == v) and blk.args is not None:
            base = {"function": gt_name, "parameter": key, "type": "", "description": ""}
            out.append(Problem("missing_required", closing_span(blk.args),
                               [{**base, "value": render_value(v)}, {**base, "value": ""}]))
    return out


class _Episode:
    """Replays one trajectory next to the ground truth (see the module docstring)."""

    def __init__(self, traj: Trajectory):
        info = traj.meta["multi_turn"]
        self.traj = traj
        self.item = mt.entry(info["bfcl_id"])
        self.env = mt.environment(self.item)
        self.gt_env = mt.environment(self.item)
        self.funcs, self.added = mt.declared_functions(self.item)
        self.tools = {f["name"]: bfcl.to_openai_tool(f)["function"] for f in self.funcs}
        self.history: list[_Call] = []
        self.model_results: list[str] = []  # every result so far (BFCL's response check is over all turns)

    def _defaults(self, name: str) -> dict:
        fn = self.env.method(name)
        if fn is None:
            return {}
        return {p.name: p.default for p in inspect.signature(fn).parameters.values()
                if p.default is not inspect.Parameter.empty}

    def matches(self, name: str, args: dict, gt: tuple[str, dict]) -> tuple[bool, Environment, str]:
        """Does (name, args) do exactly what ground-truth call `gt` would, from the current state?"""
        env_c, env_g = self.env.copy(), self.env.copy()
        r_c, r_g = env_c.call(name, args), env_g.call(*gt)
        return r_c == r_g and not env_c.changed_since(env_g), env_c, r_c

    def diagnose(self, blk: CallBlock, pending: list[tuple[str, dict]], result: str, start: int) -> list[Problem]:
        """Why a call that matched no pending ground-truth call is wrong."""
        if not pending:
            if _is_failure(result):
                return [Problem("tool_error", *self._tool_error(blk, result))]
            return [Problem("extra_call", _tag_or_name(blk, start), [{"calls_needed": 0}])]
        same = [p for p in pending if p[0] == blk.name]
        if not same:
            return [Problem("wrong_function", name_span(blk), [{"expected": pending[0][0]}])]
        probs = _arg_problems(blk, same[0][0], same[0][1], self._defaults(blk.name))
        return probs or [Problem("tool_error" if _is_failure(result) else "wrong_value", *self._tool_error(blk, result))]

    def _tool_error(self, blk: CallBlock, result: str) -> tuple[tuple[int, int], list[dict]]:
        props = (self.tools.get(blk.name, {}).get("parameters") or {}).get("properties") or {}
        valid = list(props)
        for key, f in (blk.args.fields if blk.args is not None and blk.args.is_object else {}).items():
            v = f.value.value
            if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip() and \
                    re.search(r"(?<!\w)" + re.escape(str(v).casefold()) + r"(?!\w)", result.casefold()):
                return string_content_span(f.value), [
                    {"function": blk.name, "parameter": key, "valid_parameters": valid, "description": ""},
                    {"function": "", "parameter": key, "valid_parameters": [], "description": ""}]
        a = blk.args
        span = (a.start, a.end) if a is not None and a.end > a.start else name_span(blk)
        return span, [{"function": blk.name, "parameter": "", "valid_parameters": valid, "description": ""},
                      {"function": blk.name, "parameter": "", "valid_parameters": [], "description": ""}]


def check(critic, traj: Trajectory) -> Critique:
    """The multi-turn reference critique of `traj` (critic: the calling RuleCritic, for its helpers)."""
    try:
        ep = _Episode(traj)
        spans = turn_spans(traj, len(ep.item["question"]))
    except (ValueError, KeyError) as e:
        return critic.failed(traj, f"multi-turn reference: {e}")
    finish = traj.meta.get("finish_reason") or "done"  # read before the turns: an episode may have played none
    for k, (a, b) in enumerate(spans):
        if str(k) in ep.added:
            ep.env.allow(f["name"] for f in ep.added[str(k)])
            ep.gt_env.allow(f["name"] for f in ep.added[str(k)])
            ep.tools.update({f["name"]: bfcl.to_openai_tool(f)["function"] for f in ep.added[str(k)]})
        gt_calls = [ep.gt_env.parse_call(s) for s in ep.item["ground_truth"][k]]
        gt_results = [ep.gt_env.call(n, args) for n, args in gt_calls]
        res, left = _check_turn(critic, ep, traj, k, a, b, gt_calls)
        if res is not None:
            return res
        if left and k == len(spans) - 1 and finish != "done":
            return critic.failed(traj, f"the episode ended ({finish}) in turn {k} with {left} ground-truth call(s) "
                                       f"still to make and no wrong step before")
        if gt_calls:
            official = _official_turn_check(ep, gt_results, k)
            if official is not None:
                return critic.failed(traj, f"turn {k}: BFCL's checker says {official}, but no step of the turn was "
                                           f"found wrong")
    if len(spans) < len(ep.item["question"]) or finish != "done":
        return critic.failed(traj, f"the episode ended ({finish}) after {len(spans)} of {len(ep.item['question'])} "
                                   f"turns with no wrong step in the turns played")
    return critic.ok(traj)


def _check_turn(critic, ep: _Episode, traj: Trajectory, k: int, a: int, b: int,
                gt_calls: list[tuple[str, dict]]) -> tuple[Critique | None, int]:
    """(the critique of the turn's first wrong step or None, how many ground-truth calls are left)."""
    pending = list(gt_calls)
    loose: list[_Call] = []  # calls that matched nothing, changed nothing and did not fail

    def error(step: int, problems: list) -> tuple[Critique, int]:
        text, start = message_text(traj.messages[step]), prefill_length(traj, step)
        return critic.first_error(traj, step, text, start, problems, _PRIORITY), len(pending)

    def blame_loose() -> tuple[Critique, int]:  # the first look-around after the last matched call
        c = loose[0]
        return error(c.step, ep.diagnose(c.blk, pending, c.result, prefill_length(traj, c.step)))

    for i in range(a, b):
        m = traj.messages[i]
        if m.get("role") != "assistant":
            continue
        text, start = message_text(m), prefill_length(traj, i)
        blocks = extract_calls(text)
        for blk in blocks:
            args = blk.args.value if blk.ok and blk.args is not None else None
            match = None
            if isinstance(args, dict):  # doing what the ground truth does is right, whatever the schema says
                same_name = [p for p in pending if p[0] == blk.name]
                match = next(((p, env_c, r) for p in same_name for ok, env_c, r in [ep.matches(blk.name, args, p)]
                              if ok), None)
            issues = [] if match is not None else call_issues(text, blk, ep.tools, start)
            if pending:  # a made-up name: the hint names the function the ground truth calls next
                issues = [dataclasses.replace(iss, hint_vars=[{"valid_tools": [pending[0][0]]}] + iss.hint_vars)
                          if iss.category == "unknown_tool" else iss for iss in issues]
            if issues or not blk.ok:
                return error(i, issues)
            if match is not None:
                p, env_c, result = match
                pending.remove(p)
                loose.clear()  # looking around before a matched call was fine
            else:
                env_c = ep.env.copy()
                result = env_c.call(blk.name, args)
                changed = env_c.changed_since(ep.env)
                if not changed and any(c.name == blk.name and c.args == args and c.result == result for c in ep.history):
                    return error(i, [Problem("repeated_call", _tag_or_name(blk, start),
                                             [{"function": blk.name}, {"function": ""}])])
                if changed or _is_failure(result) or not gt_calls:
                    return error(i, ep.diagnose(blk, pending, result, start))
                loose.append(_Call(i, blk, blk.name, args, result))
            ep.env = env_c
            ep.history.append(_Call(i, blk, blk.name, args, result))
            ep.model_results.append(result)
        if not blocks and pending:  # the reply that ended the turn, with calls still to make
            if loose:
                return blame_loose()
            hv = [{"expected": pending[0][0], "remaining": len(pending)}, {"expected": "", "remaining": len(pending)}]
            return error(i, [Problem("missing_call", missing_call_span(text, start, []), hv)])
    if pending and loose:  # cut off (step cap) while looking around
        return blame_loose()
    return None, len(pending)


def _official_turn_check(ep: _Episode, gt_results: list[str], k: int) -> str | None:
    """BFCL's own end-of-turn checks (state, then responses); None when they pass or cannot be imported."""
    try:
        from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import (
            response_checker,
            state_checker,
        )
    except ImportError:
        return None if ep.env.same_state(ep.gt_env) else "the state differs from the ground truth"
    out = state_checker(ep.env.instances, ep.gt_env.instances)
    if out["valid"]:
        out = response_checker(ep.model_results, gt_results, k)
    return None if out["valid"] else f"{out['error_type']}: {out['error_message']}"


# ----------------------------------------------------------------------------- several replies, flat ground truth
def assistant_steps(traj: Trajectory) -> list[int]:
    return [i for i, m in enumerate(traj.messages) if m.get("role") == "assistant"]


def is_multi_step(traj: Trajectory) -> bool:
    """A log with flat ground truth (`meta.ground_truth`, possible-answer format) and several assistant replies."""
    return "ground_truth" in traj.meta and not is_multi_turn(traj) and len(assistant_steps(traj)) > 1


def check_steps(critic, traj: Trajectory) -> Critique:
    """Several replies against one flat ground-truth list: the calls of each reply, in order, must each match a
    ground-truth entry not matched before (BFCL possible-answer semantics, any order; the reference critic's
    `match_calls`). The first reply with a call that does not parse, breaks the schema, or matches no remaining
    entry is the error (wrong_function / wrong_value / ... against the closest remaining entry, extra_call when
    none is left); entries still unmatched after the last reply make it a missing_call."""
    try:
        gt = parse_ground_truth(traj.meta["ground_truth"])
    except ValueError as e:
        return critic.failed(traj, str(e))
    tools = tools_by_name(traj)
    remaining = list(gt)
    last = None
    for i in assistant_steps(traj):
        text, start = message_text(traj.messages[i]), prefill_length(traj, i)
        blocks = extract_calls(text)
        calls = [b for b in blocks if b.ok]
        matched = match_calls(calls, remaining, tools)  # {remaining index: call index}
        free_calls = [c for j, c in enumerate(calls) if j not in matched.values()]
        free_gt = [g for k, g in enumerate(remaining) if k not in matched]
        issues = [iss for b in blocks if not b.ok for iss in call_issues(text, b, tools, start)]
        issues += [iss for b in free_calls for iss in call_issues(text, b, tools, start)]
        if not issues and free_calls:
            issues = reply_problems(text, start, free_calls, free_gt, tools, missing=False)
        if issues or len(calls) < len(blocks):
            return critic.first_error(traj, i, text, start, issues, _PRIORITY)
        remaining, last = free_gt, (i, text, start, calls)
    if remaining and last is not None:
        i, text, start, calls = last
        hv = [{"expected": remaining[0][0], "remaining": len(remaining)}, {"expected": "", "remaining": len(remaining)}]
        return critic.first_error(traj, i, text, start, [Problem("missing_call", missing_call_span(text, start, calls), hv)])
    return critic.ok(traj)


__all__ = ["check", "check_steps", "is_multi_step", "is_multi_turn", "turn_spans"]
