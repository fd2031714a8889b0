"""Smoke test of bench/critic.py --quick: it runs end to end (fake server, LLM critic, runner) and ends with its
machine-readable line. No torch and no timing assertions: speed is measured in bench/, not in the tests."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_critic_quick_runs(tmp_path):
    out = tmp_path / "critic.json"
    proc = subprocess.run([sys.executable, "bench/critic.py", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"critic_efficiency=\d+\.\d{3}", last), last
    res = json.loads(out.read_text())
    assert [r["concurrency"] for r in res["rows"]] == [1, 4, 8]
    assert all(r["failed"] == 0 and r["errors"] == r["n"] for r in res["rows"])  # every reply was a valid critique
