"""Recompute every headline number of an `opsd eval` report from its per-task outcomes, and check it.

    python scripts/recompute_report.py runs/demo/report/report.json          # check; exit 1 on any mismatch
    python scripts/recompute_report.py runs/demo/report/report.json --show   # also print the recomputed rates

report.json stores, per task (`per_task[i]`), the raw facts of the before and the after reply:
the first function name it commits to (`name`, `name_closed`), the task's `tool_names` and
`ground_truth_names`, the official checker's verdict (`official.verdict`), the reference critic's
verdict (`reference`), the critic's verdict and first-error category (`critique`), every error
found (`errors`), the finish reason (`finish_reason`), the parse error (`parse_error`), and the
sums over the ground-truth call's tokens (`gt_call`). This script rebuilds from those facts alone,
with its own rules written out below (not the evaluator's code):

- the row of every table for every reply, and each table's row counts (which must sum to n);
- every headline rate before and after, and each paired difference, 95% bootstrap CI and exact
  McNemar p (`opsd.eval.stats`, with the report's `bootstrap` and `seed`);
- every error category's rate, the per-category rates, the KL on ground-truth calls;
- the verdict of every target (`opsd.eval.targets`).

It prints one line per mismatch and exits 1 if there is any, 0 when every number matches.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from opsd.eval import stats
from opsd.eval.targets import verdicts

FINISH_STOP = ("stop", "eos", "tool_calls")


def name_row(o: dict, task: dict) -> str:
    """The function name the reply commits to: which tools it names (see README "Evaluation report")."""
    if not o["reply"]:
        return "no_reply"
    name, declared, gt = o["name"], set(task["tool_names"]), task["ground_truth_names"]
    if name is None:
        return "no_name"
    if not o["name_closed"]:  # cut off: undeclared once it has left every declared name
        return "no_name" if any(d.startswith(name) for d in declared) else "undeclared"
    if name not in declared:
        return "undeclared"
    if gt is None:
        return "declared_no_ground_truth"
    return "gt_function" if name in gt else "other_declared"


def rows_of(o: dict, task: dict) -> dict[str, str]:
    if not o["reply"]:
        return {t: "no_reply" for t in ("name", "official", "agreement", "critic", "finish", "n_errors")}
    off, ref, crit = o["official"]["verdict"], o.get("reference"), o.get("critique")
    agreement = "not_compared"
    if off in ("valid", "invalid") and ref in ("ok", "error"):
        agreement = {(True, True): "both_valid", (True, False): "official_only", (False, True): "reference_only",
                     (False, False): "both_invalid"}[(off == "valid", ref == "ok")]
    if crit is None or crit["verdict"] == "failed":
        critic = "critique_failed"
    else:
        critic = "ok" if crit["verdict"] == "ok" else (crit["category"] or "unknown")
    fr = o.get("finish_reason")
    finish = "stop" if fr in FINISH_STOP else ("length" if fr == "length" else "other")
    errs = o.get("errors")
    n_err = None if errs is None else len({e["category"] for e in errs})
    return {"name": name_row(o, task), "official": off, "agreement": agreement, "critic": critic, "finish": finish,
            "n_errors": "not_checked" if n_err is None else (str(n_err) if n_err < 3 else "3+")}


def headline(o: dict, r: dict) -> dict[str, bool]:
    return {"names_no_declared_tool": r["name"] not in ("gt_function", "other_declared", "declared_no_ground_truth"),
            "names_undeclared_tool": r["name"] == "undeclared",
            "names_declared_tool": r["name"] in ("gt_function", "other_declared", "declared_no_ground_truth"),
            "names_no_tool": r["name"] == "no_name",
            "names_gt_function": r["name"] == "gt_function",
            "official_accuracy": r["official"] == "valid",
            "reference_accuracy": o.get("reference") == "ok",
            "critic_ok": r["critic"] == "ok",
            "no_parseable_call": (not o["reply"]) or bool(o.get("parse_error")),
            "cut_off": r["finish"] == "length",
            "critique_failed": r["critic"] == "critique_failed"}


class Checker:
    def __init__(self) -> None:
        self.mismatches: list[str] = []
        self.checked = 0

    def same(self, what: str, stored, recomputed, tol: float = 1e-9) -> None:
        self.checked += 1
        if isinstance(stored, (int, float)) and isinstance(recomputed, (int, float)):
            ok = math.isclose(stored, recomputed, rel_tol=0, abs_tol=tol)
        elif isinstance(stored, list) and isinstance(recomputed, list) and len(stored) == len(recomputed):
            ok = all(math.isclose(a, b, abs_tol=tol) for a, b in zip(stored, recomputed))
        else:
            ok = stored == recomputed
        if not ok:
            self.mismatches.append(f"{what}: report says {stored!r}, recomputed {recomputed!r}")

    def paired(self, what: str, stored: dict, b: list[bool], a: list[bool], kw: dict) -> dict:
        r = stats.paired_binary(b, a, **kw)
        for k in ("n", "diff", "ci95", "p", "direction"):
            self.same(f"{what}.{k}", stored.get(k), r[k])
        self.same(f"{what}.before.count", stored["before"]["count"], sum(b))
        self.same(f"{what}.after.count", stored["after"]["count"], sum(a))
        return r


def recompute(report: dict, show: bool = False) -> Checker:
    c = Checker()
    cfg = report["config"]
    kw = {"n_boot": cfg.get("bootstrap", stats.N_BOOT), "seed": cfg.get("seed", stats.SEED)}
    tasks = report["per_task"]
    cmp = report["comparison"]
    c.same("n", cmp["n"], len(tasks))
    rows = {s: [rows_of(t[s], t) for t in tasks] for s in ("before", "after")}
    flags = {s: [headline(t[s], r) for t, r in zip(tasks, rows[s])] for s in ("before", "after")}
    recomputed = {"outcomes": {}}
    for k, stored in cmp["outcomes"].items():
        r = c.paired(f"outcomes.{k}", stored, [f[k] for f in flags["before"]], [f[k] for f in flags["after"]], kw)
        recomputed["outcomes"][k] = r | {"label": stored.get("label")}
        if show:
            print(f"{k:24s} {r['before']['count']:4d}/{r['n']} -> {r['after']['count']:4d}/{r['n']}  "
                  f"diff {100 * (r['diff'] or 0):+.1f} pts {r['ci95']}  p={r['p']}")
    for table, t in cmp["tables"].items():
        for s in ("before", "after"):
            counts = {}
            for r in rows[s]:
                counts[r[table]] = counts.get(r[table], 0) + 1
            c.same(f"tables.{table}.{s}: rows sum to n", sum(o[s]["count"] for o in t["rows"].values()), len(tasks))
            c.same(f"tables.{table}.{s}: every reply's row is listed", set(counts) - set(t["rows"]), set())
        for row, stored in t["rows"].items():
            c.paired(f"tables.{table}.{row}", stored, [r[table] == row for r in rows["before"]],
                     [r[table] == row for r in rows["after"]], kw)
    for cat, stored in cmp["errors"].items():
        c.paired(f"errors.{cat}", stored, *[[any(e["category"] == cat for e in t[s].get("errors") or [])
                                               for t in tasks] for s in ("before", "after")], kw)
    for cat, stored in cmp["per_category"].items():
        idx = [i for i, t in enumerate(tasks) if t["category"] == cat]
        c.same(f"per_category.{cat}.n", stored["n"], len(idx))
        for k, o in stored["outcomes"].items():
            c.paired(f"per_category.{cat}.{k}", o, [flags["before"][i][k] for i in idx],
                     [flags["after"][i][k] for i in idx], kw)
    gt = [t["gt_call"] for t in tasks if t.get("gt_call")]
    stored_gt = (report.get("collateral") or {}).get("gt_call")
    if stored_gt is not None:
        kl = stats.ratio_of_sums([g["kl_sum"] for g in gt], [g["n_tokens"] for g in gt], **kw)
        lp = stats.paired_mean([g["logprob_before"] / g["n_tokens"] for g in gt],
                               [g["logprob_after"] / g["n_tokens"] for g in gt], **kw)
        c.same("collateral.gt_call.n", stored_gt["n"], len(gt))
        c.same("collateral.gt_call.kl_per_token.mean", stored_gt["kl_per_token"]["mean"], kl["mean"])
        c.same("collateral.gt_call.kl_per_token.ci95", stored_gt["kl_per_token"]["ci95"], kl["ci95"])
        c.same("collateral.gt_call.logprob_per_token.diff", stored_gt["logprob_per_token"]["diff"], lp["diff"])
        if show and kl["mean"] is not None:
            print(f"{'gt_call KL per token':24s} {kl['mean']:.4f} {kl['ci95']} (n={len(gt)} calls)")
    if report.get("verdicts"):
        redo = verdicts({"comparison": recomputed | {"n": len(tasks)}, "collateral": report.get("collateral")})
        for v, w in zip(report["verdicts"], redo):
            c.same(f"verdicts.{v['key']}", v["verdict"], w["verdict"])
            if show:
                print(f"verdict {w['key']}: {w['verdict']}")
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="report.json written by opsd eval (version 2)")
    ap.add_argument("--show", action="store_true", help="print the recomputed rates and verdicts")
    a = ap.parse_args(argv)
    try:
        report = json.loads(Path(a.report).read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: {a.report}: {e}", file=sys.stderr)
        return 2
    if report.get("version") != 2 or "per_task" not in report:
        print(f"error: {a.report}: expected an opsd eval report of version 2 with per_task outcomes, "
              f"got version {report.get('version')!r}", file=sys.stderr)
        return 2
    c = recompute(report, show=a.show)
    for m in c.mismatches:
        print(f"MISMATCH {m}")
    print(f"{c.checked} numbers checked, {len(c.mismatches)} mismatches ({len(report['per_task'])} tasks)")
    return 1 if c.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
