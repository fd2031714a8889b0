"""Reference critic: compares the calls of the first assistant step with ground-truth calls.

Ground truth is `traj.meta["ground_truth"]` in BFCL's possible-answer format,
`[{"fn_name": {"param": [acceptable values...]}}]` (BFCL tasks and rollouts carry it). The
verdict follows BFCL's AST checker semantics (`bfcl_eval.eval_checker.ast_eval.ast_checker`):

- a call matches a ground-truth entry when the name is equal, every required parameter (from
  the tool schema) is present, every argument is declared by the schema AND listed in the
  ground truth, each value is of the schema type (an int is accepted for a number) and among
  the acceptable values, and every ground-truth parameter without `""` among its values is
  present (`""` = may be omitted);
- strings (also inside lists and dicts) compare after removing ` ,./-_*^`, lowercasing and
  turning `'` into `"`;
- the number of calls must equal the number of ground-truth entries, and calls are matched to
  entries in any order (greedily, entry by entry, like BFCL), so simple/multiple = exactly one
  call and parallel = any order.

When the step is wrong, the earliest problem in its text is reported:

| category          | quote (the error tokens; data/README.md defines them exactly)   |
|-------------------|-----------------------------------------------------------------|
| wrong_function    | the called name, without its quotes                             |
| wrong_value       | the value; a string of the right type without its quotes        |
| unknown_parameter | the key, without its quotes                                     |
| missing_required  | the `}` that closed the arguments instead                       |
| missing_call      | the last call's `</tool_call>` (the end of turn after it has no |
|                   | text); no call at all: the first line of the generated text     |
| extra_call        | the `<tool_call>` tag that opened the extra call                |
| invalid_json / unparsable_call | as in the schema critic                            |

Every critique carries `quote_at`; no quote starts inside the reply prefill.

Hints give the expected function, the correct value (an acceptable value that does not repeat
the wrong text) or the parameter to add.

    opsd critique --in rollouts.jsonl --out critiques.jsonl --critic reference
"""
from __future__ import annotations

from opsd_critic import multi_turn
from opsd_critic.base import RuleCritic
from opsd_critic.calls import extract_calls
from opsd_critic.matching import Problem, is_valid, parse_ground_truth, reply_problems
from opsd_critic.schema import call_issues, tools_by_name
from opsd.io.tasks.bfcl_multi_turn import is_multi_turn
from opsd.render import message_text, prefill_length
from opsd.types import Critique, Trajectory


class ReferenceCritic(RuleCritic):
    """Checks a reply against `meta.ground_truth` (see module docstring); several replies, or a BFCL multi-turn
    episode, are checked reply by reply by `opsd_critic.multi_turn` (the first wrong reply is reported)."""

    name = "reference"

    @staticmethod
    def applies(traj: Trajectory) -> bool:
        """Whether the trajectory carries ground truth to compare with (a BFCL multi-turn episode does)."""
        return "ground_truth" in traj.meta or is_multi_turn(traj.meta)

    @staticmethod
    def subsumes(traj: Trajectory) -> bool:
        """Multi-turn episodes and logs with several replies: this critic runs the schema checks itself, reply by
        reply (opsd_critic.multi_turn), so the first error is found whichever check finds it."""
        return is_multi_turn(traj.meta) or multi_turn.is_multi_step(traj)

    def check(self, traj: Trajectory) -> Critique:
        if is_multi_turn(traj.meta):  # every step of every turn: opsd_critic.multi_turn
            return multi_turn.check(self, traj)
        if multi_turn.is_multi_step(traj):  # several replies, one flat ground truth
            return multi_turn.check_steps(self, traj)
        if "ground_truth" not in traj.meta:
            return self.failed(traj, "trajectory has no meta.ground_truth; the reference critic needs it")
        try:
            gt = parse_ground_truth(traj.meta["ground_truth"])
        except ValueError as e:
            return self.failed(traj, str(e))
        step = next((i for i, m in enumerate(traj.messages) if m.get("role") == "assistant"), None)
        if step is None:
            return self.failed(traj, "trajectory has no assistant message to check")
        tools = tools_by_name(traj)
        text = message_text(traj.messages[step])
        start = prefill_length(traj, step)
        blocks = extract_calls(text)
        bad = [iss for b in blocks if not b.ok for iss in call_issues(text, b, tools, start)]
        calls = [b for b in blocks if b.ok]
        if len(calls) == len(blocks) and is_valid(calls, gt, tools):
            return self.ok(traj)
        problems = [Problem(i.category, i.span, i.hint_vars) for i in bad]
        problems += reply_problems(text, start, calls, gt, tools, missing=len(calls) == len(blocks))
        return self.first_error(traj, step, text, start, problems)
