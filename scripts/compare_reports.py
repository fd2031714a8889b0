"""Compare two `opsd eval` reports on the same held-out tasks: did a setting change an outcome?

    python scripts/compare_reports.py runs/demo-fp32/report/report.json runs/demo/report/report.json \
        --names fp32 bf16 [--side after] [--json out.json]

Each report holds per-task outcomes of its "before" and "after" models (`report.json` `per_task`). This pairs
the chosen side of report A with the same side of report B task by task (only tasks both scored), and runs
`opsd.eval.metrics.compare` on the pairs: every headline outcome, every error category, each with the two
rates, the paired difference (bootstrap 95% CI over tasks) and the exact McNemar p. One markdown table per
side. `--side round_K` compares the demo's round-K models: their held-out replies are the report folder's
`rollouts_round_K.jsonl` (critiques next to it, outcomes recomputed with the schema+reference checks), or
the report's "after" when round K was the round the demo kept. Used for RESULTS.md's fp32-vs-bf16 demo
comparison (issue 13).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def side_outcomes(report: dict, folder: Path, side: str) -> dict[str, dict]:
    """{task id: outcome} of one model of a report: "before", "after", or "round_K" (see the module docstring)."""
    if side in ("before", "after"):
        return {t["task_id"]: t[side] for t in report["per_task"]}
    m = re.fullmatch(r"round_(\d+)", side)
    if not m:
        raise ValueError(f"side must be before, after or round_K, got {side!r}")
    path = folder / f"rollouts_{side}.jsonl"
    if not path.exists():
        kept = re.search(r"round_(\d+)", str(report.get("config", {}).get("after", "")))
        if kept and kept.group(1) == m.group(1):
            return side_outcomes(report, folder, "after")
        raise FileNotFoundError(f"{path}: no held-out replies of {side} (and the report's after-model is another round)")
    from opsd.critique.outcomes import reply_outcomes as outcome_fn
    from opsd.eval.metrics import reply_outcome
    from opsd.io.records import read_jsonl
    from opsd.io.trajectories import load_trajectories
    from opsd.types import Critique

    crits = {c["trajectory_id"]: Critique.from_dict(c) for c in read_jsonl(folder / f"critiques_{side}.jsonl")}
    out: dict[str, dict] = {}
    for t in load_trajectories(path):
        out.setdefault(t.meta.get("task_id", t.id), reply_outcome(t, crits.get(t.id), outcome_fn))
    return out


def paired_tasks(a: dict, b: dict, side: str, folders: tuple[Path, Path] = (Path("."), Path("."))) -> list[dict]:
    """per_task rows whose "before" is report A's `side` and "after" report B's, on the tasks both scored."""
    oa, ob = side_outcomes(a, folders[0], side), side_outcomes(b, folders[1], side)
    return [{**t, "before": oa[t["task_id"]], "after": ob[t["task_id"]]} for t in a["per_task"]
            if t["task_id"] in oa and t["task_id"] in ob]


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
    p.add_argument("--side", nargs="+", default=["before", "after"],
                   help="models to compare: before, after, round_K (several: one table each)")
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
    folders = (Path(a.report_a).parent, Path(a.report_b).parent)
    for side in a.side:
        try:
            pairs = paired_tasks(reports[0], reports[1], side, folders)
        except (ValueError, OSError) as e:
            p.error(str(e))
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
