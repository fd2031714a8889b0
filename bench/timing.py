"""Timing rounds on a shared machine: run a child process, and say whether anything else used the CPU meanwhile.

    from bench.timing import run_child
    res, meta = run_child(cmd)      # meta: wall_s, loadavg (1/5/15 min after it), others_cpu (share of all cores)

The benchmarks hold `flock /tmp/opsd-torch.lock`, but processes that do not take the lock (tests,
editors, other agents) still share the cores. The load average alone cannot tell them apart from the
benchmark's own threads, so each round also measures what the rest of the machine used: busy CPU time
from /proc/stat over the round, minus the child's own CPU time (getrusage of children), as a share
of wall time x cores. A round where others used more than MAX_OTHERS_CPU of the machine is marked
`loaded`; the benchmarks discard such rounds and run them again (`timed_rounds`).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

MAX_OTHERS_CPU = 0.10  # a round is "loaded" when other processes used more than 10% of all cores during it


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat (busy includes steal: time the VM did not get)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return sum(v[:8]) - idle, sum(v[:8])


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(cmd: list[str], *, cwd: str | Path, out_json: str | Path) -> tuple[dict, dict]:
    """Run `cmd` (which writes its result to `out_json`); returns (result, round meta). Raises on failure."""
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    j0, c0, t0 = _busy_jiffies(), _children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    j1, c1 = _busy_jiffies(), _children_cpu_s()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    others = None
    if j0 and j1:
        busy_s = (j1[0] - j0[0]) / hz
        others = max(0.0, busy_s - (c1 - c0)) / (wall * ncpu)
    meta = {"wall_s": wall, "loadavg": [round(x, 2) for x in os.getloadavg()], "others_cpu": others,
            "child_cpu_s": c1 - c0, "loaded": others is not None and others > MAX_OTHERS_CPU}
    return json.loads(Path(out_json).read_text()), meta


def child_json_path() -> str:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        return f.name


def timed_rounds(sides: list[str], rounds: int, run_side, *, max_reruns: int = 3, log=print) -> dict[str, list[dict]]:
    """`rounds` rounds of `sides` in turn (A B A B ...); a round in which any side ran `loaded` is discarded
    (kept under "discarded") and run again, at most `max_reruns` times in all. Each result dict gets its
    round meta under "round"; a round kept after the reruns ran out says so ("loaded": true)."""
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    runs["discarded"] = []
    reruns = 0
    r = 0
    while r < rounds:
        results = {}
        for s in sides:
            res, meta = run_side(s)
            res["round"] = meta
            results[s] = res
            log(f"  round {r + 1} {s:10s} wall {meta['wall_s']:6.1f} s  load {' '.join(map(str, meta['loadavg']))}"
                f"  others' CPU {_pct(meta['others_cpu'])}" + ("  LOADED" if meta["loaded"] else ""))
        if any(v["round"]["loaded"] for v in results.values()) and reruns < max_reruns:
            reruns += 1
            runs["discarded"].append({s: v["round"] | {"times": v.get("times")} for s, v in results.items()})
            log(f"  round {r + 1} discarded (another process used the CPU); running it again")
            continue
        for s, v in results.items():
            runs[s].append(v)
        r += 1
    return runs


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.0%}"

