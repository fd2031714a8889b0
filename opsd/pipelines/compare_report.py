"""The rows and tables of `opsd compare`: paired outcomes per method against the base and against `opsd`.

    row = method_row(per_task, per_task_vs_opsd, gt_kl)   # per_task: opsd.eval.metrics.per_task_outcomes
    print(format_compare(result))                          # OUT/compare.md

Every rate counts every held-out reply, and a reply without the wanted behaviour counts against the
method in each outcome: a missing reply, a reply with no call and a reply whose check crashed are
"replies with an error"; a reply that names no tool is one that "does not name a declared tool" (the
old column "names an undeclared tool" fell when a method stopped naming tools). A crashed check also
has a column of its own. Each difference is paired on the same tasks, with a bootstrap 95% CI and an
exact McNemar p.
"""
from __future__ import annotations

from opsd.eval import stats
from opsd.eval.metrics import HEADLINE, has_error
from opsd.eval.targets import fmt_p


def any_error(o: dict) -> bool:
    """The reply has at least one error (schema or reference, whole reply; no call at all is one), or it is
    missing, or its check crashed (`not_checked`): only a reply checked and found clean is error-free."""
    return o["rows"]["n_errors"] != "0"


def check_crashed(o: dict) -> bool:
    return o["rows"]["n_errors"] == "not_checked"


OUTCOMES = {  # key: (label, predicate on a reply outcome, higher is better)
    "official_accuracy": ("accuracy (official)", HEADLINE["official_accuracy"][1], True),
    "any_error": ("replies with an error", any_error, False),
    "not_checked": ("check crashed (counted as an error)", check_crashed, False),
    "names_no_declared_tool": ("does not name a declared tool", HEADLINE["names_no_declared_tool"][1], False),
    "names_gt_function": ("names the right function", HEADLINE["names_gt_function"][1], True),
    "no_parseable_call": ("no parseable call", HEADLINE["no_parseable_call"][1], False),
}


def _paired(per_task: list[dict], pred, bootstrap: int) -> dict:
    return stats.paired_binary([pred(t["before"]) for t in per_task], [pred(t["after"]) for t in per_task],
                               n_boot=bootstrap)


def method_row(per_task: list[dict], vs_opsd: list[dict] | None, gt_kl: dict, *, bootstrap: int = stats.N_BOOT) -> dict:
    """One method's held-out outcomes: against the base (`per_task`: before = base, after = method), against
    `opsd` (`vs_opsd`: before = opsd, after = method; None for opsd itself), per error category, and the KL."""
    cats = sorted({e["category"] for t in per_task for side in ("before", "after")
                   for e in (t[side].get("errors") or [])})
    row = {"status": "trained", "n": len(per_task),
           "vs_base": {k: _paired(per_task, pred, bootstrap) for k, (_, pred, _) in OUTCOMES.items()},
           "errors_vs_base": {c: _paired(per_task, lambda o, c=c: has_error(o, c), bootstrap) for c in cats},
           "gt_call": gt_kl}
    if vs_opsd is not None:
        row["vs_opsd"] = {k: _paired(vs_opsd, pred, bootstrap) for k, (_, pred, _) in OUTCOMES.items()}
        row["errors_vs_opsd"] = {c: _paired(vs_opsd, lambda o, c=c: has_error(o, c), bootstrap) for c in cats}
    return row


def _cell(o: dict) -> str:
    ci = o.get("ci95")
    ci_s = f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""
    return f"{100 * o['after']['rate']:.1f}% ({100 * (o['diff'] or 0):+.1f}{ci_s}, p={fmt_p(o['p'])})"


def _kl(gt: dict) -> str:
    kl = (gt or {}).get("kl_per_token") or {}
    if kl.get("mean") is None:
        return "n/a"
    ci = kl.get("ci95")
    return f"{kl['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _picked(rec: dict) -> str:
    p = rec.get("picked")
    if not p:
        return rec.get("status", "n/a")
    total = sum(r["train_wall_s"] for r in rec["runs"])
    return f"{p['lr']:g} | {p['train_wall_s']:.0f} s ({total:.0f} s sweep)"


def format_compare(result: dict) -> str:
    """Markdown: the method table against the base, the table against opsd, the error categories, the sweep."""
    ho, cfg, sh = result["heldout"], result["config"], result["shared"]
    recs = {r["method"]: r for r in result["methods"]}
    keys = list(OUTCOMES)
    base_row = next((r for r in ho["rows"].values() if r.get("status") == "trained"), None)
    lines = ["# opsd compare", "",
             f"Student `{cfg['train']['model']}`; shared data: {sh['rollouts']} sampled replies "
             f"({cfg['samples']} per task on {cfg['limit']} tasks of `{cfg['tasks']}`), {sh['errors']} with a critiqued "
             f"error, {sh['passed']} passed by the critic, {sh['critique_failed']} critiques failed "
             f"({sh['shared_wall_s']:.0f} s). Every method: {cfg['steps']} optimizer steps of "
             f"{cfg['train']['batch_size']}, learning rate picked from {cfg['lrs']} on {cfg['validation_limit']} "
             f"validation tasks. Total wall time {result['wall_s']:.0f} s.", "",
             f"## Held-out, n={ho['n']} tasks of `{ho['tasks']}`, paired with the base", "",
             "Cells: rate (change in points against the base [95% CI], McNemar p). KL: per token, base to method, on "
             "the ground-truth calls [95% CI]. Wall: training at the picked learning rate (and the whole sweep).", "",
             "| method | " + " | ".join(OUTCOMES[k][0] for k in keys) + " | KL on GT calls | lr | train wall |",
             "|---" * (len(keys) + 4) + "|"]
    if base_row:
        lines.append("| base | " + " | ".join(f"{100 * base_row['vs_base'][k]['before']['rate']:.1f}%" for k in keys)
                     + " | 0 | | |")
    for m, row in ho["rows"].items():
        tag = " (reference: sees the answers)" if m == "sft-gt" else ""
        if row.get("status") != "trained":
            lines.append(f"| {m}{tag} | " + " | ".join("not trained" for _ in keys) + f" | | {row['status']} | |")
            continue
        lines.append(f"| {m}{tag} | " + " | ".join(_cell(row["vs_base"][k]) for k in keys)
                     + f" | {_kl(row['gt_call'])} | {_picked(recs[m])} |")
    vs = [(m, r) for m, r in ho["rows"].items() if r.get("vs_opsd")]
    if vs:
        lines += ["", "## Against opsd, on the same held-out tasks", "",
                  "Cells: rate (change in points against opsd [95% CI], McNemar p); a negative change in an error "
                  "rate favours the method, a positive one favours opsd.", "",
                  "| method | " + " | ".join(OUTCOMES[k][0] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(_cell(r["vs_opsd"][k]) for k in keys) + " |" for m, r in vs]
    cats = sorted({c for r in ho["rows"].values() for c in r.get("errors_vs_base", {})})
    if cats:
        lines += ["", "## Every error category (multi-label), against the base", "",
                  "A reply without a parseable call has none of the per-call errors: read each column next to the "
                  "first.", "",
                  "| method | no parseable call | " + " | ".join(cats) + " |", "|---" * (len(cats) + 2) + "|"]
        if base_row:
            lines.append(f"| base | {100 * base_row['vs_base']['no_parseable_call']['before']['rate']:.1f}% | " + " | ".join(
                f"{100 * base_row['errors_vs_base'][c]['before']['rate']:.1f}%" if c in base_row["errors_vs_base"]
                else "0.0%" for c in cats) + " |")
        for m, r in ho["rows"].items():
            if r.get("status") == "trained":
                lines.append(f"| {m} | {_cell(r['vs_base']['no_parseable_call'])} | " + " | ".join(
                    _cell(r["errors_vs_base"][c]) if c in r["errors_vs_base"] else "0.0%" for c in cats) + " |")
    lines += ["", "## Learning-rate sweep (validation)", "",
              "Picked by `Validation.better_than`: accuracy, then the right function in a parseable call, then "
              "parseable replies, then fewer replies with an error.", "",
              "| method | data | lr | val. accuracy | val. right function, parseable (any) | val. parseable "
              "| val. replies with an error (check crashed) | train wall |", "|---|---|---|---|---|---|---|---|"]

    def val(v: dict) -> str:
        return (f"{v['accuracy']:.3f} | {v.get('gt_function_parseable', 0.0):.3f} ({v['gt_function']:.3f}) | "
                f"{v.get('parseable', 0.0):.3f} | {v['error_rate']:.3f} ({v.get('not_checked', 0.0):.3f})")

    lines.append(f"| base | | | {val(result['base_validation'])} | |")
    for m, rec in recs.items():
        data = ", ".join(f"{k} {v}" for k, v in rec["data"].items())
        if not rec["runs"]:
            lines.append(f"| {m} | {data} | | {rec.get('status')}: {rec.get('reason', '')} | | | | |")
        for run in rec["runs"]:
            mark = " (picked)" if rec.get("picked") and run["lr"] == rec["picked"]["lr"] else ""
            lines.append(f"| {m} | {data} | {run['lr']:g}{mark} | {val(run['validation'])} | {run['train_wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"
