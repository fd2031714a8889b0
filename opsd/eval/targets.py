"""The evaluation's targets and a plain verdict for each: met / not met / not significant / not testable.

    from opsd.eval.targets import verdicts
    for v in verdicts(report): print(v["verdict"], v["target"], v["evidence"])

Targets (issue "Evaluation that cannot flatter"), all on paired before/after replies to the same tasks:
- the rate of replies that do NOT name a declared tool (they name an undeclared one, name none, or the
  reply is missing) falls by >= 50% relative, with McNemar p < 0.01;
- no collapse: neither "names no tool" nor "no parseable call" rises (no rise with p < 0.05);
- the official-checker accuracy does not fall (no fall with p < 0.05; the CI and any rise's p stated);
- the per-token KL(before||after) on the ground-truth calls is < 0.05 nats (the CI's upper end below it).

The rule behind the first two: an error-type outcome counts every reply without the wanted behaviour
against the model. "Names an undeclared tool" alone falls when a model stops naming anything (issue 24:
86% -> 0% "met" while "names no tool" went 0% -> 79%); "does not name a declared tool" cannot fall
that way, and the collapse guard puts the rise of replies without a call on a verdict line of its own.

"not testable" says that a target could not fail (or could not be met) on this data, so it is never
reported as met. Testability comes from the test itself: a fall (rise) is testable only when moving
every reply that could move gives McNemar p below the target's threshold (`reachable`): accuracy
with fewer than 6 correct base replies cannot fall with p < 0.05 (2 * 0.5^5 = 0.0625).
"""
from __future__ import annotations

from opsd.eval.stats import mcnemar_exact

NO_DECLARED_RELATIVE_DROP = 0.5
NO_DECLARED_P = 0.01
ALPHA = 0.05
KL_MAX = 0.05

TARGETS = {
    "no_declared_tool_falls": f"does not name a declared tool (names an undeclared tool, none, or no reply): falls "
                              f"by >= {NO_DECLARED_RELATIVE_DROP:.0%} relative (paired McNemar p < {NO_DECLARED_P})",
    "no_collapse": f"no collapse: 'names no tool' and 'no parseable call' do not rise (no rise with p < {ALPHA})",
    "official_accuracy_holds": f"official BFCL accuracy: does not fall (no fall with p < {ALPHA})",
    "gt_call_kl": f"per-token KL(before||after) on ground-truth calls < {KL_MAX} nats (95% CI below it)",
}


def reachable(movable: int, alpha: float) -> bool:
    """Whether `movable` replies, all changing the same way, would give an exact McNemar p below `alpha`."""
    return mcnemar_exact(movable, 0) < alpha


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pts(ci) -> str:
    return "n/a" if not ci else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def binary_evidence(o: dict) -> str:
    """'41/128 (32.0%) -> 10/128 (7.8%), diff -24.2 pts [-31.3, -17.2], relative -76% [...], p=3e-08'."""
    b, a = o["before"], o["after"]
    s = (f"{b['count']}/{b['n']} ({_pct(b['rate'])}) -> {a['count']}/{a['n']} ({_pct(a['rate'])}), "
         f"diff {100 * (o['diff'] or 0):+.1f} pts {_pts(o['ci95'])}")
    if o.get("relative") is not None:
        rel_ci = o.get("relative_ci95")
        s += f", relative {100 * o['relative']:+.0f}%" + (f" [{100 * rel_ci[0]:+.0f}, {100 * rel_ci[1]:+.0f}]"
                                                           if rel_ci else "")
    return s + f", McNemar p={fmt_p(o['p'])}, n={o['n']}"


def _count(o: dict, side: str) -> int:
    return o[side]["count"] if o else 0


def no_declared_tool_falls(o: dict, undeclared: dict | None = None, no_name: dict | None = None) -> tuple[str, str]:
    """`o`: the paired outcome "does not name a declared tool"; `undeclared`/`no_name`: its parts, for the evidence."""
    ev = binary_evidence(o)
    if undeclared is not None and no_name is not None:
        parts = [(side, _count(undeclared, side), _count(no_name, side)) for side in ("before", "after")]
        ev += "; of which " + ", ".join(f"{side}: undeclared {u}, no name {x}, no reply {_count(o, side) - u - x}"
                                        for side, u, x in parts)
    k = o["before"]["count"]
    if not reachable(k, NO_DECLARED_P):
        return "not testable", ev + (f" (only {k} replies missed a declared tool before: even fixing all of them "
                                     f"gives p = {fmt_p(mcnemar_exact(k, 0))}, not below {NO_DECLARED_P})")
    big = o["relative"] is not None and o["relative"] <= -NO_DECLARED_RELATIVE_DROP
    if big and o["p"] < NO_DECLARED_P:
        return "met", ev
    return ("not significant" if big else "not met"), ev


def no_collapse(no_name: dict, no_parse: dict) -> tuple[str, str]:
    """Not met when replies that name no tool, or that hold no parseable call, rose with p < ALPHA."""
    ev = f"names no tool: {binary_evidence(no_name)}; no parseable call: {binary_evidence(no_parse)}"
    rose = [label for label, o in (("names no tool", no_name), ("no parseable call", no_parse))
            if o["diff"] is not None and o["diff"] > 0 and o["p"] < ALPHA]
    if rose:
        return "not met", ev + f" (COLLAPSE: {' and '.join(rose)} rose significantly)"
    if not any(reachable(o["n"] - o["before"]["count"], ALPHA) for o in (no_name, no_parse)):
        return "not testable", ev + " (nearly every reply already lacked a name and a parseable call: cannot rise)"
    return "met", ev


def official_accuracy_holds(o: dict) -> tuple[str, str]:
    ev = binary_evidence(o)
    if o["diff"] is not None and o["diff"] > 0:
        ev += f"; a rise, p={fmt_p(o['p'])}" + (" (significant)" if o["p"] < ALPHA else " (not significant)")
    k = o["before"]["count"]
    if not reachable(k, ALPHA):
        return "not testable", ev + (f" ({k} correct before: even losing all of them gives McNemar "
                                     f"p = {fmt_p(mcnemar_exact(k, 0))}, so accuracy cannot fall significantly)")
    if o["diff"] is not None and o["diff"] < 0 and o["p"] < ALPHA:
        return "not met", ev
    return "met", ev


def gt_call_kl(summary: dict) -> tuple[str, str]:
    kl = summary.get("kl_per_token") or {}
    if not summary.get("n") or kl.get("mean") is None:
        return "not testable", "no task with a ground-truth call was scored (n=0)"
    ci = kl.get("ci95")
    ev = (f"{kl['mean']:.4f} nats/token" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
          + f" on {summary['n_tokens']} tokens of n={summary['n']} ground-truth calls")
    lp = summary.get("logprob_per_token") or {}
    if lp.get("diff") is not None:
        ev += f"; log-prob per token {lp['diff']:+.3f}" + (f" [{lp['ci95'][0]:+.3f}, {lp['ci95'][1]:+.3f}]"
                                                           if lp.get("ci95") else "") + f", permutation p={fmt_p(lp['p'])}"
    if kl["mean"] >= KL_MAX:
        return "not met", ev
    return ("met" if ci and ci[1] < KL_MAX else "not significant"), ev


def verdicts(report: dict) -> list[dict]:
    """[{"key", "target", "verdict", "evidence"}] for the report's comparison and collateral."""
    out = report["comparison"]["outcomes"]
    gt = (report.get("collateral") or {}).get("gt_call") or {}
    checks = {"no_declared_tool_falls": no_declared_tool_falls(out["names_no_declared_tool"],
                                                               out.get("names_undeclared_tool"), out.get("names_no_tool")),
              "no_collapse": no_collapse(out["names_no_tool"], out["no_parseable_call"]),
              "official_accuracy_holds": official_accuracy_holds(out["official_accuracy"]),
              "gt_call_kl": gt_call_kl(gt)}
    return [{"key": k, "target": TARGETS[k], "verdict": v, "evidence": ev} for k, (v, ev) in checks.items()]
