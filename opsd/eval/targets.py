"""The evaluation's targets and a plain verdict for each: met / not met / not significant / not testable.

    from opsd.eval.targets import verdicts
    for v in verdicts(report): print(v["verdict"], v["target"], v["evidence"])

Targets (issue "Evaluation that cannot flatter"), all on paired before/after replies to the same tasks:
- the rate of replies that name an undeclared tool falls by >= 50% relative, with McNemar p < 0.01;
- the rate of replies that name a declared tool rises (p < 0.05);
- the official-checker accuracy does not fall (no fall with p < 0.05; the CI and any rise's p stated);
- the per-token KL(before||after) on the ground-truth calls is < 0.05 nats (the CI's upper end below it).

"not testable" says that a target could not fail on this data (e.g. accuracy 0 before cannot fall),
so it is never reported as met.
"""
from __future__ import annotations

UNDECLARED_RELATIVE_DROP = 0.5
UNDECLARED_P = 0.01
ALPHA = 0.05
KL_MAX = 0.05

TARGETS = {
    "undeclared_tool_falls": f"names an undeclared tool: falls by >= {UNDECLARED_RELATIVE_DROP:.0%} relative "
                             f"(paired McNemar p < {UNDECLARED_P})",
    "declared_tool_rises": f"names a declared tool: rises (paired McNemar p < {ALPHA})",
    "official_accuracy_holds": f"official BFCL accuracy: does not fall (no fall with p < {ALPHA})",
    "gt_call_kl": f"per-token KL(before||after) on ground-truth calls < {KL_MAX} nats (95% CI below it)",
}


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


def undeclared_tool_falls(o: dict) -> tuple[str, str]:
    ev = binary_evidence(o)
    if o["before"]["count"] == 0:
        return "not testable", ev + " (no reply named an undeclared tool before: nothing to lower)"
    big = o["relative"] is not None and o["relative"] <= -UNDECLARED_RELATIVE_DROP
    if big and o["p"] < UNDECLARED_P:
        return "met", ev
    return ("not significant" if big else "not met"), ev


def declared_tool_rises(o: dict) -> tuple[str, str]:
    ev = binary_evidence(o)
    if o["before"]["count"] == o["n"]:
        return "not testable", ev + " (every reply named a declared tool before: cannot rise)"
    if o["diff"] is not None and o["diff"] > 0:
        return ("met" if o["p"] < ALPHA else "not significant"), ev
    return "not met", ev


def official_accuracy_holds(o: dict) -> tuple[str, str]:
    ev = binary_evidence(o)
    if o["diff"] is not None and o["diff"] > 0:
        ev += f"; a rise, p={fmt_p(o['p'])}" + (" (significant)" if o["p"] < ALPHA else " (not significant)")
    if o["before"]["count"] == 0:
        return "not testable", ev + " (0 correct before: accuracy cannot fall)"
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
                                                           if lp.get("ci95") else "") + f", sign-test p={fmt_p(lp['p'])}"
    if kl["mean"] >= KL_MAX:
        return "not met", ev
    return ("met" if ci and ci[1] < KL_MAX else "not significant"), ev


def verdicts(report: dict) -> list[dict]:
    """[{"key", "target", "verdict", "evidence"}] for the report's comparison and collateral."""
    out = report["comparison"]["outcomes"]
    gt = (report.get("collateral") or {}).get("gt_call") or {}
    checks = {"undeclared_tool_falls": undeclared_tool_falls(out["names_undeclared_tool"]),
              "declared_tool_rises": declared_tool_rises(out["names_declared_tool"]),
              "official_accuracy_holds": official_accuracy_holds(out["official_accuracy"]),
              "gt_call_kl": gt_call_kl(gt)}
    return [{"key": k, "target": TARGETS[k], "verdict": v, "evidence": ev} for k, (v, ev) in checks.items()]
