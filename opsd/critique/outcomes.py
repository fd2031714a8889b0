"""Every error in a reply, by the rule critics' checks (an `OutcomeFn` for `opsd.eval`).

    from opsd.critique.outcomes import reply_outcomes
    reply_outcomes(traj)   # {"errors": [{"category", "source", "call", "quote"}, ...], "reference": "ok"|...}

The critics report only the first error of a reply (the one to train on). An evaluation needs
all of them: this runs the schema checks (`opsd_critic.schema.call_issues`) over every `<tool_call>`
block of the reply and, when the task has ground truth, the reference comparison over every
parsed call (`opsd_critic.reference`), and returns each problem found. `reference` is the reference
critic's verdict on the reply ("ok" | "error" | "failed"; "n/a" without ground truth).
A reply that makes no call at all is an error too: `missing_call` (one per ground-truth call) when the
task has ground truth, `no_call` when it has none. So prose, a copied placeholder or an empty reply
never counts as error-free (every outcome that counts errors counts it against the model).
The critic modules are used read-only; `opsd.eval` receives this function from its caller and
never imports `opsd_critic` itself.
"""
from __future__ import annotations

from opsd_critic.calls import extract_calls
from opsd_critic.matching import call_problems, match_calls, parse_ground_truth
from opsd_critic.reference import ReferenceCritic
from opsd_critic.schema import call_issues, tools_by_name
from opsd.render import message_text
from opsd.types import Trajectory

_QUOTE_CHARS = 80


def _quote(text: str, span) -> str:
    return text[span[0]:span[1]][:_QUOTE_CHARS] if span else ""


def reference_problems(blocks, gt, tools) -> list[tuple[str, int | None, object]]:
    """[(category, call index, span)] of every mismatch between the parsed calls and the ground truth.

    The same matching as the reference critic (`match_calls`: BFCL's any-order matching), but every
    unmatched call and every missing call is listed, not only the earliest problem.
    """
    calls = [b for b in blocks if b.ok]
    matched = match_calls(calls, gt, tools)
    free_gt = [i for i in range(len(gt)) if i not in matched]
    out = []
    for j, blk in enumerate(calls):
        if j in matched.values():
            continue
        if not free_gt:
            out.append(("extra_call", blk.index, (blk.start, blk.start + len("<tool_call>"))))
            continue
        same = [i for i in free_gt if gt[i][0] == blk.name] or free_gt
        best = min(same, key=lambda i: len(call_problems(blk, *gt[i], tools)))
        out += [(p.category, blk.index, p.span) for p in call_problems(blk, *gt[best], tools)]
        free_gt.remove(best)
    if free_gt and len(blocks) < len(gt):  # a broken call is not missing: the schema checks counted it
        out += [("missing_call", None, None)] * (len(gt) - len(blocks))
    return out


def reply_outcomes(traj: Trajectory) -> dict:
    """All schema and reference problems of the trajectory's last assistant message, and the reference verdict."""
    msg = traj.messages[-1] if traj.messages else {}
    if msg.get("role") != "assistant":
        return {"errors": [{"category": "no_reply", "source": "outcomes", "call": None, "quote": ""}],
                "reference": "failed"}
    text = message_text(msg)
    tools = tools_by_name(traj)
    blocks = extract_calls(text)
    errors = []
    for b in blocks:
        for iss in call_issues(text, b, tools):
            errors.append({"category": iss.category, "source": "schema", "call": b.index,
                           "quote": _quote(text, iss.span)})
    reference = "n/a"
    if ReferenceCritic.applies(traj):
        reference = ReferenceCritic().check(traj).verdict
        try:
            gt = parse_ground_truth(traj.meta["ground_truth"])
        except ValueError:
            gt = None
        if gt is not None:
            for cat, call, span in reference_problems(blocks, gt, tools):
                errors.append({"category": cat, "source": "reference", "call": call, "quote": _quote(text, span)})
    if not blocks and not msg.get("tool_calls") and not any(e["category"] == "missing_call" for e in errors):
        errors.append({"category": "no_call", "source": "outcomes", "call": None, "quote": text[:_QUOTE_CHARS]})
    return {"errors": errors, "reference": reference}
