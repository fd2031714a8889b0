"""Run the benchmarks (critic, rollout, numerics, step; cost curves on request) and rewrite BENCHMARKS.md.

    flock /tmp/opsd-torch.lock make bench                        # = pip install -e ".[bench]"; python bench/run_all.py
    flock /tmp/opsd-torch.lock python bench/run_all.py --quick --out /tmp/BENCH_QUICK.md   # smoke sizes

    python bench/run_all.py --render-only --kind avx2              # rewrite one kind's section from its saved results

Each benchmark runs as its own process (they spawn one process per side themselves) and writes
its results to bench/results/KIND/NAME.json, KIND being this machine's CPU kind (bench/machine.py:
avx512_bf16, avx2, ...); machine.json there records the CPU's ISA features and the precision `auto`
picks. This script collects them, checks them against the targets of issues 13 and 6 and rewrites
this kind's section of the markdown, keeping the other kinds' sections (bench/report.py). Every
benchmark runs at the precision the machine uses (bf16 only where the CPU has bf16 units; the bf16
numerics are skipped where it has none). It does not take the torch lock itself: run it under
`flock /tmp/opsd-torch.lock` so that no other torch job shares the 2 cores. The cost curves
(bench/curves.py, ~30 min) run only with `--only curves` (or `python bench/curves.py --axis ...` in
separate lock sessions); the report always includes bench/results/KIND/curves.json when it exists.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import machine, report  # noqa: E402  (after the path fix, for `python bench/run_all.py`)

BUDGET_S = 30 * 60
# (name, args) in run order; the cheap, torch-free one first
BENCHMARKS = [
    ("critic", ["--profile", "14"]),
    ("rollout", ["--profile", "15"]),
    ("numerics", []),
    ("step", ["--profile", "20"]),
]
ON_REQUEST = [("curves", [])]  # run only when named in --only
BF16_ONLY = {"numerics": "precision auto is fp32 on this CPU kind (no bf16 units), so bf16 numerics do not apply"}


def results_dir(kind: str, *, quick: bool = False) -> Path:
    """Where a run on a CPU of `kind` keeps its raw results (one folder per kind, as BENCHMARKS.md has one section)."""
    return BENCH / ("results-quick" if quick else "results") / kind


def run_one(name: str, extra: list[str], out_json: Path, timeout: float, quick: bool) -> dict:
    cmd = [sys.executable, f"bench/{name}.py", "--json", str(out_json.relative_to(ROOT))] + extra
    if quick:
        cmd.append("--quick")
    shown = " ".join(shlex.quote(c) for c in ["python"] + cmd[1:])
    print(f"\n=== {name}: {shown} (time left {timeout / 60:.1f} min)", flush=True)
    t0 = time.perf_counter()
    status, tail = "ok", ""
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = proc.stdout
        print(proc.stdout, end="", flush=True)
        if proc.returncode != 0:
            status = f"failed (rc {proc.returncode})"
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {timeout:.0f} s"
        tail = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    wall = time.perf_counter() - t0
    result = json.loads(out_json.read_text()) if status == "ok" and out_json.exists() else None
    lines = []  # the trailing machine-readable lines (key=value ...)
    for line in reversed(tail.strip().splitlines()):
        if not re.fullmatch(r"(\w+=[-\d.]+ ?)+", line.strip()):
            break
        lines.insert(0, line.strip())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())  # > 2 on 2 cores: something else was running
    return {"name": name, "command": shown, "status": status, "wall_s": wall, "result": result, "loadavg": load,
            "machine_line": lines[-1] if lines else "", "machine_lines": lines, "tail": tail[-3000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke sizes for every benchmark (not a measurement)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--only", default="", help="comma-separated subset of critic,rollout,numerics,step,curves")
    p.add_argument("--render-only", action="store_true", help="rewrite the markdown from the saved results only")
    p.add_argument("--budget-min", type=float, default=BUDGET_S / 60, help="total time budget (minutes)")
    p.add_argument("--kind", help="with --render-only: the CPU kind whose saved results are rendered (default: this "
                                  "machine's; " + ", ".join(machine.KINDS) + ")")
    a = p.parse_args(argv)
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    if a.render_only:
        only = {"(none)"}
    facts = machine.machine_facts()
    if a.kind and not a.render_only:
        p.error("--kind only goes with --render-only: a run measures the machine it runs on")
    out_dir = results_dir(a.kind or facts["kind"], quick=a.quick)
    if a.render_only and not (out_dir / "machine.json").exists():
        p.error(f"--render-only: no saved results in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {facts['cpu']} ({machine.kind_label(facts['kind'])}; precision auto = {facts['precision']}), "
          f"{facts['cores']} cores, torch {facts['torch']}, trl {facts['trl']}; results in {out_dir}", flush=True)
    deadline = time.perf_counter() + a.budget_min * 60
    runs = []
    previous = {}
    if (out_dir / "machine.json").exists():
        previous = {r["name"]: r for r in json.loads((out_dir / "machine.json").read_text())["runs"]}
    for name, extra in BENCHMARKS + [b for b in ON_REQUEST if b[0] in only]:
        if only and name not in only:  # keep the previous run's result for the report
            old, path = previous.get(name), out_dir / f"{name}.json"
            if old and old["status"] == "ok" and path.exists():
                note = "" if a.render_only or "# from" in old["command"] else "  # from the previous run"
                runs.append(dict(old, result=json.loads(path.read_text()), status="ok", command=old["command"] + note))
            continue
        if name in BF16_ONLY and facts["precision"] != "bf16":
            runs.append({"name": name, "status": f"skipped: {BF16_ONLY[name]}", "result": None, "command": "",
                         "wall_s": 0.0, "machine_line": "", "tail": ""})
            continue
        left = deadline - time.perf_counter()
        if left < 30:
            runs.append({"name": name, "status": "skipped: 30-minute budget spent", "result": None, "command": "",
                         "wall_s": 0.0, "machine_line": "", "tail": ""})
            continue
        runs.append(run_one(name, extra, out_dir / f"{name}.json", left, a.quick))
    total = sum(r["wall_s"] for r in runs)
    if a.render_only and previous:
        total = json.loads((out_dir / "machine.json").read_text())["total_s"]
        facts = json.loads((out_dir / "machine.json").read_text())["facts"]
    (out_dir / "machine.json").write_text(json.dumps({"facts": facts, "total_s": total,
                                                          "runs": [{k: v for k, v in r.items() if k != "result"}
                                                                   for r in runs]}, indent=2))
    previous = Path(a.out).read_text() if Path(a.out).exists() else None
    Path(a.out).write_text(report.render(facts, runs, total_s=total, quick=a.quick, results_dir=out_dir,
                                         previous=previous))
    print(f"\nwrote {a.out} ({total / 60:.1f} min in all)")
    for r in runs:
        print(f"{r['name']}: {r['status']}  {r['machine_line']}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
