"""Validating a large JSONL log streams with bounded memory: peak RSS and throughput of `opsd validate`.

Writes a synthetic log of realistic agent trajectories (multi-turn, tool schemas, tool results,
generated token ids on some replies; one line in a thousand invalid, some lines repeated verbatim
without an id), then runs `opsd validate LOG --rejects R` in a fresh process and reads that process's
peak RSS from the kernel (`getrusage(RUSAGE_CHILDREN).ru_maxrss`). Target (issue 15): a 1 GiB log
validates with peak RSS < 1 GiB.

    python bench/validate_memory.py                       # 1 GiB log in a temp folder, then deleted
    python bench/validate_memory.py --size-mb 64 --json bench/results/validate_memory.json
    python bench/validate_memory.py --compress gzip       # the same log gzipped
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

TARGET_RSS_BYTES = 1 << 30
TOOLS = [{"type": "function", "function": {
    "name": f"tool_{k}", "description": f"Tool number {k}: looks things up in system {k} and returns JSON.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "what to look up"},
        "limit": {"type": "integer", "minimum": 1, "maximum": 100},
        "unit": {"type": "string", "enum": ["metric", "imperial"]}}, "required": ["query"]}}} for k in range(8)]


def trajectory(i: int, rng: random.Random) -> dict:
    """One realistic multi-turn agent episode (about 5 KB as JSON)."""
    msgs = [{"role": "system", "content": "You are a careful assistant. Use the tools when they help; answer briefly."},
            {"role": "user", "content": f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40)))}]
    for step in range(rng.randint(1, 4)):
        name = f"tool_{rng.randrange(8)}"
        args = json.dumps({"query": " ".join(rng.choice(WORDS) for _ in range(4)), "limit": rng.randint(1, 50)})
        reply = {"role": "assistant", "content": f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>',
                 "tool_calls": [{"id": f"call_{step}", "type": "function", "function": {"name": name, "arguments": args}}]}
        if rng.random() < 0.5:
            reply["token_ids"] = [rng.randrange(49152) for _ in range(rng.randint(30, 90))]
        msgs.append(reply)
        result = {"results": [{"title": " ".join(rng.choice(WORDS) for _ in range(6)), "score": round(rng.random(), 3)}
                              for _ in range(rng.randint(2, 8))]}
        msgs.append({"role": "tool", "tool_call_id": f"call_{step}", "content": json.dumps(result)})
    msgs.append({"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))})
    return {"id": f"episode-{i}", "messages": msgs, "tools": TOOLS[:rng.randint(2, 8)],
            "meta": {"task": f"task-{i % 997}", "reward": rng.random(), "tags": ["bench", f"shard-{i % 7}"]}}


WORDS = ("weather flight hotel price stock ticket order refund account balance city date time route train bus "
         "museum restaurant review rating distance currency rate translate schedule meeting invoice").split()


def write_log(path: Path, size_bytes: int, seed: int = 0) -> dict:
    """A JSONL log of about `size_bytes`; returns counts of what it holds."""
    rng = random.Random(seed)
    n = bad = repeated = 0
    written = 0
    repeat_line = json.dumps({k: v for k, v in trajectory(-1, rng).items() if k != "id"}) + "\n"
    with path.open("w", encoding="utf-8") as f:
        while written < size_bytes:
            n += 1
            if n % 1000 == 0:
                line, bad = '{"id": "broken-%d", "messages": [{"role": "robot"}]}\n' % n, bad + 1
            elif n % 1000 == 500:
                line, repeated = repeat_line, repeated + 1  # identical lines without an id: all must be kept
            else:
                line = json.dumps(trajectory(n, rng)) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    return {"lines": n, "invalid_lines": bad, "repeated_lines": repeated, "bytes": written}


def compress(path: Path, kind: str) -> Path:
    if kind == "none":
        return path
    out = path.with_suffix(path.suffix + (".gz" if kind == "gzip" else ".zst"))
    with path.open("rb") as src, (gzip.open(out, "wb", compresslevel=1) if kind == "gzip"
                                  else zstandard.ZstdCompressor(level=3).stream_writer(out.open("wb"))) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return out


def run_validate(log: Path, rejects: Path) -> dict:
    """`opsd validate` in a fresh process: wall time, exit code, its summary line, its peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "opsd.cli", "validate", str(log), "--rejects", str(rejects)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over finished children, in KiB
    if peak_kb <= before:
        raise RuntimeError("could not attribute a peak RSS to the validate process")
    return {"wall_s": wall, "returncode": proc.returncode, "stdout": proc.stdout.strip(),
            "stderr_tail": proc.stderr.strip()[-500:], "peak_rss_bytes": peak_kb * 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=1024, help="log size in MiB (default 1024 = 1 GiB)")
    ap.add_argument("--compress", choices=("none", "gzip", "zstd"), default="none")
    ap.add_argument("--dir", default=None, help="where to write the log (default: a temp folder, deleted after)")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="opsd-validate-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        log = workdir / "log.jsonl"
        t0 = time.perf_counter()
        counts = write_log(log, int(args.size_mb * (1 << 20)))
        gen_s = time.perf_counter() - t0
        target = compress(log, args.compress)
        run = run_validate(target, workdir / "rejects.jsonl")
        rejected = sum(1 for _ in (workdir / "rejects.jsonl").open(encoding="utf-8"))
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    valid_expected = counts["lines"] - counts["invalid_lines"]
    result = {
        **counts, "compress": args.compress, "file_bytes": os.path.getsize(target) if args.dir else None,
        "generate_s": round(gen_s, 1), "validate_wall_s": round(run["wall_s"], 1),
        "lines_per_s": round(counts["lines"] / run["wall_s"], 1),
        "mib_per_s": round(counts["bytes"] / (1 << 20) / run["wall_s"], 2),
        "peak_rss_mib": round(run["peak_rss_bytes"] / (1 << 20), 1),
        "rss_target_met": run["peak_rss_bytes"] < TARGET_RSS_BYTES,
        "rejected": rejected, "all_counted": rejected == counts["invalid_lines"]
        and f"{valid_expected} valid" in run["stdout"],
        "summary_line": run["stdout"], "returncode": run["returncode"],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"validate_peak_rss_mib={result['peak_rss_mib']} validate_lines_per_s={result['lines_per_s']} "
          f"rss_target_met={result['rss_target_met']} all_counted={result['all_counted']}")
    return 0 if result["rss_target_met"] and result["all_counted"] else 1


if __name__ == "__main__":
    sys.exit(main())
