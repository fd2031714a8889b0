"""Forgetting: per-token KL(base || tuned) on the base model's own greedy replies to prompts that are not tool calls.

    from opsd.eval.forgetting import base_replies, forgetting_kl
    replies = base_replies("smollm2-135m-instruct", Path("runs/compare/forgetting"), n=64)   # cached on disk
    forgetting_kl(base_lm, tuned_lm, replies)    # {"kl_per_token": {"mean", "ci95"}, "n", "n_tokens"}

What a method teaches about tool calls can cost what the model knew before ("RL's Razor": at a
matched gain, forgetting tracks KL(base || tuned), and on-policy training forgets less than SFT).
The probe asks the BFCL `irrelevance` questions (plain questions: areas, history, physics) with
NO tools, no system prompt and no reply prefill, takes the base model's greedy reply to each, and
scores it teacher-forced under both models: the mean over reply tokens of
KL(base || tuned) = Σ_v p_base(v) (log p_base(v) − log p_tuned(v)), with a bootstrap CI over
prompts. 0 means the tuned model answers general questions exactly as the base did. These prompts
never enter training (no split of `irrelevance` is trained on anywhere in opsd).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from opsd.eval import stats
from opsd.io import models
from opsd.io.tasks.bfcl import _read_jsonl, data_dir
from opsd.render import render
from opsd.rollout.hf import generate_batch
from opsd.train.scoring import span_logprobs
from opsd.types import Trajectory, content_hash

CATEGORY = "irrelevance"


def probe_prompts(n: int) -> list[str]:
    """The first `n` BFCL irrelevance questions (single user turns), in file order."""
    items = _read_jsonl(data_dir() / f"BFCL_v4_{CATEGORY}.json")
    return [it["question"][0][0]["content"] for it in items[:n]]


def base_replies(base: str, out: Path, *, n: int = 64, max_new_tokens: int = 64, batch_size: int = 16,
                 precision: str = "auto") -> list[dict]:
    """The base model's greedy reply to each probe prompt, as {"prompt_ids", "reply_ids"}; cached in
    OUT/base_replies-<key>.jsonl (the key covers the model, n, the token budget and the precision)."""
    key = content_hash({"base": str(base), "n": n, "max_new_tokens": max_new_tokens, "precision": precision})[:10]
    path = out / f"base_replies-{key}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines()]
    lm, tok = models.load(base, precision=precision)
    prompts = [render(Trajectory(f"probe_{i}", [{"role": "user", "content": q}]), tok, add_generation_prompt=True).input_ids
               for i, q in enumerate(probe_prompts(n))]
    rows = []
    with torch.no_grad():
        for k in range(0, len(prompts), batch_size):
            batch = prompts[k:k + batch_size]
            for p, (ids, _) in zip(batch, generate_batch(lm, tok, batch, max_new_tokens=max_new_tokens,
                                                         stop_text=[None] * len(batch))):
                if ids:  # an empty reply has no token to score
                    rows.append({"prompt_ids": list(p), "reply_ids": list(ids)})
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@torch.no_grad()
def forgetting_kl(base_lm, tuned_lm, replies: list[dict], *, batch_size: int = 8, n_boot: int = stats.N_BOOT,
                  seed: int = stats.SEED) -> dict:
    """Per-token KL(base || tuned) over the replies' tokens (see module docstring)."""
    ids = [r["prompt_ids"] + r["reply_ids"] for r in replies]
    spans = [(len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r["reply_ids"])) for r in replies]
    kl_sums, counts = [], []
    for k in range(0, len(ids), batch_size):
        sl = slice(k, k + batch_size)
        p = span_logprobs(base_lm, ids[sl], spans[sl], batch_size=batch_size, return_rows=True).rows
        q = span_logprobs(tuned_lm, ids[sl], spans[sl], batch_size=batch_size, return_rows=True).rows
        for lp_LV, lq_LV in zip(p, q):
            kl_L = (lp_LV.exp() * (lp_LV - lq_LV)).sum(-1)  # (L,) KL(base || tuned) per reply token
            kl_sums.append(float(kl_L.sum()))
            counts.append(len(kl_L))
    return {"n": len(replies), "n_tokens": sum(counts), "prompts": CATEGORY,
            "kl_per_token": stats.ratio_of_sums(kl_sums, counts, n_boot=n_boot, seed=seed)}
