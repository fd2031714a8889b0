"""LLM-critic throughput: critiques/s vs concurrency against a local fake server with fixed latency.

    python bench/critic.py                      # concurrency 1 4 8 16 32 64, 200 ms latency
    python bench/critic.py --quick              # small smoke run (a few seconds, no torch)

The server (`opsd_critic.fake_server.FakeServer`) runs in its own process so that its threads do not
compete with the client for the GIL; it sleeps `--latency` seconds per request and answers with
a valid `error` critique of the trajectory (step, verbatim quote, hint), so every reply goes
through the critic's full path: Jinja prompt, HTTP, JSON-schema check, critique validation, and
the runner's fsynced JSONL append (`opsd_critic.runner.run_critiques`).

Ideal throughput is concurrency / latency. Each level critiques `--per-slot` x concurrency
distinct trajectories (so every slot makes the same number of sequential requests); the
median of `--repeats` runs is reported. The last line is machine-readable:

    critic_efficiency=X      # achieved / ideal critiques/s at concurrency 32 (or the largest level run)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/critic.py` from anywhere
    sys.path.insert(0, str(ROOT))

# The trajectory every request critiques (one varied user message keeps the keys distinct), and
# the error critique the server returns for it: step 2 quotes the hallucinated function name.
BASE_TRAJECTORY = {
    "id": "bench",
    "messages": [
        {"role": "system", "content": "You are a travel assistant. Use the tools when they help."},
        {"role": "user", "content": "Is it raining in Zürich right now?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function",
             "function": {"name": "weather.get_current", "arguments": "{\"city\": \"Zürich\"}"}}]},
    ],
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
}
ERROR_REPLY = json.dumps({"verdict": "error", "step": 2, "quote": "weather.get_current",
                          "hint": "That function is not one of the available tools; the only valid tool is get_weather.",
                          "category": "unknown_tool"})


def serve(port: int, latency: float, nodelay: bool) -> None:
    """Child process: the fake server answering every request with ERROR_REPLY after `latency` s.

    `nodelay` is `FakeServer(nodelay=...)`: TCP_NODELAY on its sockets (the default, as real servers
    behind vLLM/SGLang set it). The server writes headers and body in two small writes, so with
    Nagle on the body waits for the client's delayed ACK (~40 ms on Linux): every request then
    takes latency + ~44 ms. The headline number uses TCP_NODELAY; Nagle on is measured too.
    """
    from opsd_critic.fake_server import FakeServer, Reply

    srv = FakeServer(responder=lambda body: Reply(ERROR_REPLY), latency=latency, port=port, nodelay=nodelay)
    srv.start()
    print(f"serving {srv.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(latency: float, nodelay: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--latency", str(latency)]
                            + (["--nodelay"] if nodelay else []),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()  # blocks until the server is listening
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, line.split()[1]


def trajectories(n: int, tag: str):
    from opsd.types import Trajectory

    out = []
    for i in range(n):
        d = json.loads(json.dumps(BASE_TRAJECTORY))
        d["id"] = f"bench-{tag}-{i}"
        d["messages"][1]["content"] += f" (request {tag}-{i})"  # distinct content hash -> distinct key
        out.append(Trajectory.from_dict(d))
    return out


def run_level(base_url: str, concurrency: int, n: int, tag: str) -> dict:
    """Critique n trajectories at `concurrency`; returns wall time, rate and verdict counts."""
    from opsd_critic.llm import LLMConfig, LLMCritic
    from opsd_critic.runner import run_critiques

    os.environ.setdefault("OPSD_BENCH_KEY", "bench-no-auth")
    critic = LLMCritic(LLMConfig(base_url=base_url, model="fake-critic", api_key_env="OPSD_BENCH_KEY",
                                 timeout=30.0, max_attempts=3, backoff=0.1))
    trajs = trajectories(n, tag)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        s = run_critiques(trajs, critic, Path(d) / "critiques.jsonl", concurrency=concurrency, progress=False)
        wall = time.perf_counter() - t0
    return {"n": n, "wall_s": wall, "rate": n / wall, "errors": s.verdicts.get("error", 0),
            "failed": s.verdicts.get("failed", 0)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    p.add_argument("--latency", type=float, default=0.2, help="fixed server latency per request (s)")
    p.add_argument("--per-slot", type=int, default=8, help="requests per concurrency slot per run")
    p.add_argument("--min-n", type=int, default=32, help="at least this many critiques per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per level (median reported)")
    p.add_argument("--quick", action="store_true", help="smoke sizes: concurrency 1 4 8, 2 per slot, 1 repeat")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--shipped-levels", type=int, nargs="*", default=[1, 32],
                   help="levels also run with Nagle on (FakeServer(nodelay=False)); none to skip")
    p.add_argument("--profile", type=int, default=0,
                   help="cProfile one extra run at concurrency 32 and keep the top-N functions (0: off)")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the server child
    p.add_argument("--nodelay", action="store_true", help=argparse.SUPPRESS)  # internal: server child option
    a = p.parse_args(argv)
    if a.serve:
        serve(a.serve, a.latency, a.nodelay)
        return {}
    if a.quick:
        a.concurrency, a.per_slot, a.min_n, a.repeats, a.shipped_levels = [1, 4, 8], 2, 4, 1, [4]

    result = {"latency_s": a.latency, "rows": sweep(a, a.concurrency, nodelay=True)}
    if a.profile:
        result["profile"] = profile_level(a, 32)
    if a.shipped_levels:
        print("same, with Nagle on (FakeServer(nodelay=False)):", flush=True)
        result["rows_shipped"] = sweep(a, a.shipped_levels, nodelay=False)
    at = next((r for r in result["rows"] if r["concurrency"] == 32), result["rows"][-1])
    result |= {"efficiency_at": at["concurrency"], "critic_efficiency": at["efficiency"]}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(f"critic_efficiency={at['efficiency']:.3f}")
    return result


def profile_level(a, concurrency: int) -> str:
    """cProfile of the client process for one run at `concurrency` (top functions by own time)."""
    import cProfile
    import io
    import pstats

    proc, base_url = start_server(a.latency, True)
    try:
        run_level(base_url, 4, 8, "pwarm")
        n = max(a.min_n, a.per_slot * concurrency)
        prof = cProfile.Profile()
        prof.enable()
        r = run_level(base_url, concurrency, n, "prof")
        prof.disable()
    finally:
        proc.kill()
        proc.wait()
    buf = io.StringIO()
    buf.write(f"cProfile of the client, concurrency {concurrency}, n={n}: {r['wall_s']:.2f} s wall, "
              f"{r['rate']:.1f} critiques/s (profiling overhead included)\n")
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(a.profile)
    text = "\n".join(l for l in buf.getvalue().splitlines() if l.strip())
    print(text, flush=True)
    return text


def sweep(a, levels: list[int], *, nodelay: bool) -> list[dict]:
    """One server process; the median rate of `a.repeats` runs at each concurrency level."""
    proc, base_url = start_server(a.latency, nodelay)
    rows = []
    try:
        run_level(base_url, 4, 8, "warmup")  # imports, first connections
        for c in levels:
            n = max(a.min_n, a.per_slot * c)
            runs = [run_level(base_url, c, n, f"c{c}r{r}") for r in range(a.repeats)]
            rate = statistics.median(r["rate"] for r in runs)
            ideal = c / a.latency
            rows.append({"concurrency": c, "n": n, "rate": rate, "ideal": ideal, "efficiency": rate / ideal,
                         "runs": [round(r["rate"], 2) for r in runs], "nodelay": nodelay,
                         "failed": sum(r["failed"] for r in runs), "errors": sum(r["errors"] for r in runs)})
            print(f"concurrency {c:3d}: {rate:7.2f} critiques/s  ideal {ideal:7.1f}  efficiency {rate / ideal:6.1%}"
                  f"  (n={n}, runs {rows[-1]['runs']}, failed {rows[-1]['failed']})", flush=True)
    finally:
        proc.kill()
        proc.wait()
    return rows


if __name__ == "__main__":
    main()
