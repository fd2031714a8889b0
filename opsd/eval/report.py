"""Write an evaluation report: report.json (stable keys, per-task outcomes), report.md, and PNG plots.

    from opsd.eval.report import write_report, summary_table
    print(summary_table(report))      # the verdicts, then the headline before/after table

report.md opens with a plain verdict per target (`opsd.eval.targets`), then the tables. Every
table states n; every before/after difference is paired (the same tasks) with its 95% bootstrap
CI and exact McNemar p, and is called "up"/"down" only when p < 0.05. The rows of each table
partition the replies (they sum to n; `critique_failed` and `no_reply` are rows); the error
table is multi-label and says so.
"""
from __future__ import annotations

import json
from pathlib import Path

from opsd.eval.metrics import HEADLINE, TABLES
from opsd.eval.plots import make_plots
from opsd.eval.targets import fmt_p
from opsd.train.diagnostics import format_summary

_ROW_LABELS = {
    "gt_function": "names the ground-truth function", "other_declared": "names another declared tool",
    "declared_no_ground_truth": "names a declared tool (task has no ground truth)",
    "undeclared": "names an undeclared tool", "no_name": "names no tool", "no_reply": "no reply (rollout failed)",
    "valid": "valid", "invalid": "invalid", "n/a": "not a BFCL task",
    "both_valid": "both valid", "official_only": "official valid, reference error",
    "reference_only": "reference ok, official invalid", "both_invalid": "both invalid",
    "not_compared": "not compared (no verdict from one of them)", "ok": "ok", "critique_failed": "critique_failed",
    "stop": "stop (end of turn or stop text)", "length": "length (cut off at the token limit)", "other": "other",
    "0": "no error found", "1": "1 error category", "2": "2 error categories", "3+": "3 or more error categories",
    "not_checked": "not checked (the check crashed, or no outcome function)",
}

_HIDDEN_WHEN_EMPTY = ("no_reply", "declared_no_ground_truth", "n/a", "other", "not_compared", "not_checked")


def _fmt(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    if not isinstance(x, float):
        return str(x)
    return f"{round(x, nd) or 0.0:.{nd}f}"  # never "-0.000"


def _cell(r: dict) -> str:
    return f"{100 * r['rate']:.1f}% ({r['count']})"


def _diff(o: dict) -> str:
    if o["diff"] is None:
        return "n/a"
    ci = o["ci95"]
    return f"{100 * o['diff']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else f"{100 * o['diff']:+.1f}"


def _change(o: dict) -> str:
    return {"up": "**up**", "down": "**down**"}.get(o["direction"], "no significant change")


def verdict_lines(report: dict) -> list[str]:
    n = report["comparison"]["n"]
    lines = [f"Verdicts (n={n} held-out tasks; before and after replies paired on the same tasks):", ""]
    for v in report.get("verdicts") or []:
        lines.append(f"- **{v['verdict'].upper()}**: {v['target']}. {v['evidence']}")
    return lines


def outcome_table(cmp: dict, keys=None) -> list[str]:
    rows = [f"| outcome (n={cmp['n']} tasks, paired) | before | after | after − before, pts [95% CI] | McNemar p | change |",
            "|---|---|---|---|---|---|"]
    for k in keys or HEADLINE:
        o = cmp["outcomes"][k]
        rows.append(f"| {HEADLINE[k][0]} | {_cell(o['before'])} | {_cell(o['after'])} | {_diff(o)} | {fmt_p(o['p'])} | "
                    f"{_change(o)} |")
    return rows


def partition_table(cmp: dict, table: str) -> list[str]:
    t = cmp["tables"][table]
    rows = [f"| {t['title']} (n={t['n']}) | before | after | after − before, pts [95% CI] | McNemar p | change |",
            "|---|---|---|---|---|---|"]
    tb = ta = 0
    for r, o in t["rows"].items():
        tb, ta = tb + o["before"]["count"], ta + o["after"]["count"]
        if r in _HIDDEN_WHEN_EMPTY and not (o["before"]["count"] or o["after"]["count"]):
            continue  # still summed into "all replies"
        rows.append(f"| {_ROW_LABELS.get(r, 'error: ' + r)} | {_cell(o['before'])} | {_cell(o['after'])} | "
                    f"{_diff(o)} | {fmt_p(o['p'])} | {_change(o)} |")
    rows.append(f"| all replies | {tb} | {ta} | | | |")
    return rows


def agreement_line(cmp: dict) -> str:
    """How often the official checker and the reference critic agree, over the replies both judged."""
    rows = cmp["tables"]["agreement"]["rows"]
    parts = []
    for side in ("before", "after"):
        agree = rows["both_valid"][side]["count"] + rows["both_invalid"][side]["count"]
        n = agree + rows["official_only"][side]["count"] + rows["reference_only"][side]["count"]
        parts.append(f"{side} {agree}/{n}" + (f" ({100 * agree / n:.1f}%)" if n else ""))
    return "Official checker and reference critic agree on: " + ", ".join(parts) + " of the replies both judged."


def errors_table(cmp: dict) -> list[str]:
    if not cmp["errors"]:
        return []
    rows = [f"| error category present (multi-label: a reply counts once per category it has; n={cmp['n']}) "
            "| before | after | after − before, pts [95% CI] | McNemar p | change |", "|---|---|---|---|---|---|"]
    o = cmp["outcomes"].get("no_parseable_call")
    if o:  # a reply without a call has none of the per-call errors below: read them next to this row
        rows.append(f"| (no parseable call: read every row below next to it) | {_cell(o['before'])} | "
                    f"{_cell(o['after'])} | {_diff(o)} | {fmt_p(o['p'])} | {_change(o)} |")
    for cat, o in cmp["errors"].items():
        rows.append(f"| {cat} | {_cell(o['before'])} | {_cell(o['after'])} | {_diff(o)} | {fmt_p(o['p'])} | {_change(o)} |")
    return rows


def per_category_table(cmp: dict) -> list[str]:
    keys = ("names_no_declared_tool", "names_no_tool", "names_gt_function", "official_accuracy")
    head = " | ".join(HEADLINE[k][0] for k in keys)
    rows = [f"| category (n, tools per task) | {head} |", "|---" * (len(keys) + 1) + "|"]
    for cat, c in cmp["per_category"].items():
        cells = []
        for k in keys:
            o = c["outcomes"][k]
            star = f" ({o['direction']}, p={fmt_p(o['p'])})" if o["direction"] != "no significant change" else ""
            cells.append(f"{100 * o['before']['rate']:.1f}% → {100 * o['after']['rate']:.1f}%{star}")
        rows.append(f"| {cat} (n={c['n']}, {c['n_tools_mean']:.1f}) | " + " | ".join(cells) + " |")
    return rows


def teacher_forced_table(tf: dict) -> list[str]:
    if not tf.get("n_examples"):
        return [f"Teacher-forced: no buildable error of the base model (build counts: {tf.get('build_counts')})."]
    es, ft, pe = tf["error_span_logprob"], tf["first_token_logprob"], tf["error_span_paired"]
    ci = pe.get("ci95") or [None, None]
    return [f"| teacher-forced on {tf['n_examples']} held-out errors of the base model | before | after | hinted teacher |",
            "|---|---|---|---|",
            f"| mean error-span log-prob | {_fmt(es['before'])} | {_fmt(es['after'])} | {_fmt(es['hinted'])} |",
            f"| after − before [95% CI], permutation p | | {_fmt(pe['diff'])} [{_fmt(ci[0])}, {_fmt(ci[1])}], "
            f"p={fmt_p(pe['p'])} | |",
            f"| first error token log-prob | {_fmt(ft['before'])} | {_fmt(ft['after'])} | {_fmt(ft['hinted'])} |",
            f"| examples lowered | | {tf['lowered']['count']}/{tf['lowered']['n']} | |",
            f"| argmax flip rate at first error token (n={tf['argmax_flip_base']}) | | {_fmt(tf['argmax_flip_rate'], 2)} | |",
            f"| hinted-teacher gap closed | | {_fmt(tf['gap_closed'], 2)} | |"]


def collateral_table(col: dict) -> list[str]:
    if not col:
        return []
    g = col.get("gt_call") or {}
    kl, lp = g.get("kl_per_token") or {}, g.get("logprob_per_token") or {}
    kl_ci, lp_ci = kl.get("ci95") or [None, None], lp.get("ci95") or [None, None]
    base = col.get("base_fully_correct") or {}
    rows = ["| collateral | value |", "|---|---|",
            f"| KL(before‖after) per token on ground-truth calls (n={g.get('n', 0)} calls, {g.get('n_tokens', 0)} tokens)"
            f" | {_fmt(kl.get('mean'), 4)} [{_fmt(kl_ci[0], 4)}, {_fmt(kl_ci[1], 4)}] |",
            f"| Δ log-prob per token of the ground-truth call (n={lp.get('n', 0)}), permutation p={fmt_p(lp.get('p'))}"
            f" | {_fmt(lp.get('diff'))} [{_fmt(lp_ci[0])}, {_fmt(lp_ci[1])}] |",
            f"| KL(before‖after) per token, base model's generated tokens outside error spans "
            f"(n={col['kl_outside_error_spans']['n_tokens']} tokens) | {_fmt(col['kl_outside_error_spans']['mean'], 4)} |",
            f"| KL(before‖after) per token, base model's replies the critic passed "
            f"(n={col['kl_critic_ok_replies']['n_tokens']} tokens) | {_fmt(col['kl_critic_ok_replies']['mean'], 4)} |"]
    for k, label in (("official", "official checker"), ("reference", "reference critic"), ("critic", "critic")):
        if k in base:
            rows.append(f"| base-model replies fully correct ({label}) | {base[k]['count']}/{base[k]['n']} |")
    return rows


def summary_table(report: dict) -> str:
    """The verdicts, the headline before/after table and the ground-truth-call collateral (printed by the CLI)."""
    cmp = report["comparison"]
    lines = verdict_lines(report) + [""] + outcome_table(cmp) + [""] + partition_table(cmp, "name")
    g = (report.get("collateral") or {}).get("gt_call")
    if g:
        lines += [""] + collateral_table(report["collateral"])[:4]
    return "\n".join(lines)


def write_report(report: dict, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = make_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str))
    cfg, cmp, data = report["config"], report["comparison"], report.get("data") or {}
    md = ["# opsd evaluation report", "", f"before: `{cfg['before']}`  ", f"after: `{cfg['after']}`  ",
          f"tasks: `{cfg['tasks']}` (limit {cfg['limit']}; {data.get('n_tasks', cmp['n'])} tasks: "
          f"{data.get('by_category', {})}, {data.get('mean_tools_per_task', 0):.1f} tools per task)", "",
          *verdict_lines(report), "", "## Outcomes", "", *outcome_table(cmp), ""]
    for table in TABLES:
        md += [f"### {cmp['tables'][table]['title']}", "", *partition_table(cmp, table), ""]
        if table == "agreement":
            md += [agreement_line(cmp), ""]
    md += ["### Every error in the reply", "", *(errors_table(cmp) or ["(no outcome function: not checked)"]), "",
           "## Per category", "", *per_category_table(cmp), "",
           "## Teacher-forced", "", *teacher_forced_table(report.get("teacher_forced") or {}), "",
           "## Collateral", "", *collateral_table(report.get("collateral") or {}), ""]
    splits = data.get("bfcl_splits")
    if splits:
        md += [f"BFCL splits: {splits['items']} items, {splits['questions']} distinct questions; "
               f"{splits['dropped']} duplicates dropped ({splits['dropped_duplicate_of_other_category']} of a question "
               f"in another category); train {splits['per_split']['train']['n']}, validation "
               f"{splits['per_split']['validation']['n']}, held-out {splits['per_split']['heldout']['n']}.", ""]
    if report.get("training_diagnostics"):
        md += ["## Training diagnostics (teacher vs student at the target positions)", "",
               format_summary(report["training_diagnostics"]), ""]
    md += [f"![{p}]({p})" for p in report["plots"]]
    (out / "report.md").write_text("\n".join(md) + "\n")
