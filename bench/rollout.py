"""Rollout throughput on BFCL tasks: `opsd rollout` (hf backend) vs a naive batch-8 `generate`.

    flock /tmp/opsd-torch.lock python bench/rollout.py             # 24 tasks, ~6 min on 2 cores
    flock /tmp/opsd-torch.lock python bench/rollout.py --quick     # 4 tasks, 16 new tokens

Same model (embedded SmolLM2-135M, fp32, CPU), same first N tasks of `bfcl:simple_python:train`,
same prompts (`opsd.render.prompt_ids` + the `<tool_call>\\n` prefill), greedy, max_new_tokens 128.
Sides, each in its own process, alternated round by round (model load included in the time):

- `naive`: the baseline written here: tasks in order, batches of 8, left-padded, plain
  `model.generate(max_new_tokens=128, do_sample=False)`; each output is cut at the first
  end-of-turn id afterwards. A batch runs until its longest row is done.
- `naive_stop`: the same plus `stop_strings="</tool_call>"` (the stopping rule opsd uses), to
  separate the gain of stopping at the call from the gain of the decode loop itself.
- `opsd`: `opsd.rollout.main(RolloutConfig(...))` as `opsd rollout` runs it: length-sorted,
  left-padded batches (default batch 16), per-row stop at `</tool_call>` / end of turn, and
  finished rows dropped from the batch and its KV cache. `opsd_b8`: the same at batch 8.

Outputs are compared: the share of tasks whose reply text up to the first `</tool_call>` is
identical between `opsd` and `naive` (greedy decoding should agree; padding can flip near-ties).
The last line is machine-readable:

    rollout_speedup=X      # opsd items/s / naive items/s
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TASKS = "bfcl:simple_python:train"
STOP = "</tool_call>"


def cut(text: str) -> str:
    """Reply text up to and including the first </tool_call> (what both sides should agree on)."""
    i = text.find(STOP)
    return text if i < 0 else text[:i + len(STOP)]


def run_naive(a, stop: bool) -> dict:
    import torch

    from opsd.io import models
    from opsd.io.tasks import load_tasks
    from opsd.render import prompt_ids

    t0 = time.perf_counter()
    model, tok = models.load(a.model, device="cpu", dtype=torch.float32)
    model.eval()
    tasks = load_tasks(a.tasks, limit=a.limit)
    prefill = tok("<tool_call>\n", add_special_tokens=False)["input_ids"]
    prompts = [prompt_ids(t.messages, t.tools, tok) + prefill for t in tasks]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts, new_tokens = [], 0
    with torch.no_grad():
        for i in range(0, len(prompts), a.naive_batch):
            chunk = prompts[i:i + a.naive_batch]
            L = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
            kw = {"stop_strings": STOP, "tokenizer": tok} if stop else {}
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.max_new_tokens,
                                 do_sample=False, pad_token_id=pad, **kw)
            new_tokens += out.shape[0] * (out.shape[1] - L)  # rows decoded, finished or not
            for row in out[:, L:].tolist():
                row = row[:row.index(pad)] if pad in row else row  # cut at the first end-of-turn id (= pad)
                texts.append(tok.decode(prefill + row, skip_special_tokens=False))
    wall = time.perf_counter() - t0
    return {"items": len(tasks), "wall_s": wall, "texts": [cut(t) for t in texts], "decoded_slots": new_tokens}


def run_opsd(a, batch: int) -> dict:
    from opsd.rollout.run import RolloutConfig, main

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rollouts.jsonl"
        cfg = RolloutConfig(tasks=a.tasks, out=str(out), model=a.model, limit=a.limit, batch_size=batch,
                            max_new_tokens=a.max_new_tokens, device="cpu")
        t0 = time.perf_counter()
        summary = main(cfg)
        wall = time.perf_counter() - t0
        recs = {json.loads(l)["meta"]["task_id"]: json.loads(l) for l in out.read_text().splitlines()}
    from opsd.io.tasks import load_tasks

    order = [t.id for t in load_tasks(a.tasks, limit=a.limit)]
    texts = [cut(recs[i]["messages"][-1]["content"]) for i in order]
    gen = sum(len(recs[i]["messages"][-1].get("token_ids", [])) for i in order)
    return {"items": summary["total"], "wall_s": wall, "texts": texts, "generated_tokens": gen,
            "errors": summary["errors"]}


def run_profile(a) -> dict:
    """What bounds decoding: the cost of one decode step vs batch width, where rows stop, and
    torch.profiler top ops of `generate_batch` on one batch of 8."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from opsd.io import models
    from opsd.io.tasks import load_tasks
    from opsd.render import prompt_ids
    from opsd.rollout.run import generate_batch

    model, tok = models.load(a.model, device="cpu", dtype=torch.float32)
    model.eval()
    tasks = load_tasks(a.tasks, limit=a.limit)
    prefill = tok("<tool_call>\n", add_special_tokens=False)["input_ids"]
    prompts = sorted((prompt_ids(t.messages, t.tools, tok) + prefill for t in tasks), key=len, reverse=True)
    out: dict = {"step_ms_by_width": {}}
    with torch.no_grad():
        for w in (1, 4, 8, 16):  # per decode step at ~prompt-length context, after a prefill
            chunk = prompts[:w]
            L = max(len(p) for p in chunk)
            ids = torch.tensor([[2] * (L - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
            cache = DynamicCache()
            o = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)
            t0, n = time.perf_counter(), 16
            for _ in range(n):
                mask = torch.cat([mask, mask.new_ones((w, 1))], dim=1)
                o = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                nxt = o.logits[:, -1].argmax(-1, keepdim=True)
            out["step_ms_by_width"][w] = (time.perf_counter() - t0) / n * 1000
        res = []
        for i in range(0, len(prompts), a.batch):  # opsd's batches: where does each row stop?
            res += generate_batch(model, tok, prompts[i:i + a.batch], max_new_tokens=a.max_new_tokens,
                                  stop_text=[STOP] * len(prompts[i:i + a.batch]))
        out["finish"] = {k: sum(f == k for _, f in res) for k in ("stop", "eos", "length")}
        out["gen_lengths"] = sorted(len(g) for g, _ in res)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate_batch(model, tok, prompts[:8], max_new_tokens=32, stop_text=[STOP] * 8)
    out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile)
    return out


def child(side: str, a) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, __file__, "--side", side, "--out-json", path, "--model", a.model, "--tasks", a.tasks,
           "--limit", str(a.limit), "--max-new-tokens", str(a.max_new_tokens), "--naive-batch", str(a.naive_batch),
           "--batch", str(a.batch), "--profile", str(a.profile)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"side {side} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(Path(path).read_text())
    if side != "profile":
        print(f"  {side:10s} {res['items']} items in {res['wall_s']:6.1f} s = {res['items'] / res['wall_s']:.3f} "
              "items/s", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=24, help="first N tasks")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--naive-batch", type=int, default=8)
    p.add_argument("--batch", type=int, default=16, help="opsd rollout batch size (its default)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of naive / opsd (A B A B)")
    p.add_argument("--extra-sides", default="naive_stop,opsd_b8", help="run once after the rounds ('' to skip)")
    p.add_argument("--profile", type=int, default=0,
                   help="also run the decode profile (step cost vs batch width, finish reasons, top-N ops); 0: off")
    p.add_argument("--profile-only", action="store_true", help="run only the decode profile, merged into --json")
    p.add_argument("--quick", action="store_true", help="smoke sizes: 4 tasks, 16 new tokens, 1 round, no extras")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--side", choices=["naive", "naive_stop", "opsd", "opsd_b8", "profile"], help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.limit, a.max_new_tokens, a.rounds, a.extra_sides = 4, 16, 1, ""
    if a.side:
        res = {"naive": lambda: run_naive(a, False), "naive_stop": lambda: run_naive(a, True),
               "opsd": lambda: run_opsd(a, a.batch), "opsd_b8": lambda: run_opsd(a, 8),
               "profile": lambda: run_profile(a)}[a.side]()
        Path(a.out_json).write_text(json.dumps(res))
        return res

    if a.profile_only:  # add the decode profile to an existing result
        result = json.loads(Path(a.json).read_text())
        result["decode_profile"] = child("profile", a)
        Path(a.json).write_text(json.dumps(result, indent=2))
        print(f"rollout_speedup={result['rollout_speedup']:.3f}")
        return result
    print(f"rollout benchmark: {a.limit} tasks of {a.tasks}, max_new_tokens {a.max_new_tokens}, "
          f"{a.rounds} round(s) naive/opsd", flush=True)
    runs: dict[str, list[dict]] = {"naive": [], "opsd": []}
    for _ in range(a.rounds):
        for s in ("naive", "opsd"):
            runs[s].append(child(s, a))
    for s in [x.strip() for x in a.extra_sides.split(",") if x.strip()]:
        runs[s] = [child(s, a)]
    summary = {}
    for s, rs in runs.items():
        rates = [r["items"] / r["wall_s"] for r in rs]
        summary[s] = {"items_per_s": statistics.median(rates), "runs": [round(x, 4) for x in rates],
                      "wall_s": statistics.median(r["wall_s"] for r in rs), "items": rs[0]["items"],
                      "generated_tokens": rs[0].get("generated_tokens"), "decoded_slots": rs[0].get("decoded_slots")}
    ref = runs["naive"][0]["texts"]
    for s, rs in runs.items():
        summary[s]["same_text_as_naive"] = sum(x == y for x, y in zip(rs[0]["texts"], ref)) / len(ref)
    speedup = summary["opsd"]["items_per_s"] / summary["naive"]["items_per_s"]
    result = {"config": {k: getattr(a, k) for k in ("model", "tasks", "limit", "max_new_tokens", "naive_batch",
                                                     "batch", "rounds")},
              "sides": summary, "rollout_speedup": speedup}
    if a.profile:
        result["decode_profile"] = child("profile", a)
    for s, v in summary.items():
        print(f"{s:10s} {v['items_per_s']:.3f} items/s (runs {v['runs']})  same text as naive: "
              f"{v['same_text_as_naive']:.0%}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(f"rollout_speedup={speedup:.3f}")
    return result


if __name__ == "__main__":
    main()
