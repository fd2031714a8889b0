"""Compare two `opsd eval` reports on the same held-out tasks: did a setting change an outcome?

    python scripts/compare_reports.py runs/demo-fp32/report/report.json runs/demo/report/report.json \
        --names fp32 bf16 [--side after] [--json out.json]

Each report holds per-task outcomes of its "before" and "after" models (`report.json` `per_task`). This pairs
the chosen side of report A with the same side of report B task by task (only tasks both scored), and runs
`opsd.eval.metrics.compare` on the pairs: every headline outcome, every error category, each with the two
rates, the paired difference (bootstrap 95% CI over tasks) and the exact McNemar p. Both sides are printed
as one markdown table per side. Used for RESULTS.md's fp32-vs-bf16 demo comparison (issue 13).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def paired_tasks(a: dict, b: dict, side: str) -> list[dict]:
    """per_task rows whose "before" is report A's `side` and "after" report B's, on the tasks both scored."""
    by_id = {t["task_id"]: t for t in b["per_task"]}
    out = []
    for t in a["per_task"]:
        u = by_id.get(t["task_id"])
        if u is not None:
            out.append({**t, "before": t[side], "after": u[side]})
    return out


def _pct(r: dict) -> str:
    return f"{100 * r['rate']:.1f}% ({r['count']})"


def table(cmp: dict, names: tuple[str, str]) -> list[str]:
    lines = [f"| outcome (n = {cmp['n']}) | {names[0]} | {names[1]} | {names[1]} − {names[0]}, pts [95% CI] | "
             "McNemar p |", "|---|---|---|---|---|"]
    rows = [(v["label"], v) for v in cmp["outcomes"].values()]
    rows += [(f"error: `{k}`", v) for k, v in sorted(cmp["errors"].items())]
    for label, v in rows:
        lo, hi = v["ci95"] or (float("nan"), float("nan"))
        lines.append(f"| {label} | {_pct(v['before'])} | {_pct(v['after'])} | {100 * v['diff']:+.1f} "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {v['p']:.3g} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    from opsd.eval.metrics import compare

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("report_a")
    p.add_argument("report_b")
    p.add_argument("--names", nargs=2, default=["A", "B"], help="labels of the two reports")
    p.add_argument("--side", choices=["before", "after", "both"], default="both")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--json", help="also write the comparisons here")
    a = p.parse_args(argv)
    reports = []
    for path in (a.report_a, a.report_b):
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"{path}: cannot read an opsd eval report.json: {e}")
        if "per_task" not in reports[-1]:
            p.error(f"{path}: no per_task outcomes (expected an `opsd eval` report.json, version >= 2)")
    out = {}
    for side in (["before", "after"] if a.side == "both" else [a.side]):
        pairs = paired_tasks(reports[0], reports[1], side)
        if not pairs:
            p.error("the two reports share no task")
        out[side] = compare(pairs, n_boot=a.bootstrap)
        print(f"\n### {side} model: {a.names[0]} vs {a.names[1]}\n")
        print("\n".join(table(out[side], tuple(a.names))))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
