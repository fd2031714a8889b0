"""bf16 vs fp32 numerics on real hinted examples: the training loss and gradient norm on the same batches, and
every example's hint effect.

    flock /tmp/opsd-torch.lock python bench/numerics.py --json bench/results/numerics.json     # ~3 min on 2 cores

Data: the 240 real SmolLM2-135M BFCL rollouts of tests/fixtures/bfcl_rollouts.jsonl, critiqued by the
schema+reference critics (validated as the critique stage does), turned into hinted examples by
`opsd.hint.build.build_examples` (user-turn hint above the step, quote span) exactly as `opsd hint` does.

- **Hint effect** (`opsd.hint.measure.measure`, the model as its own hinted teacher): once with fp32
  weights, once with bf16 weights (what inference at `--precision bf16` holds). Per example: the
  difference, whether the sign (the hint lowers the error) agrees, and whether the example would be
  kept by `opsd train`'s default filter (`min_hint_effect` 0) under both.
- **Loss and gradient norm**: the OPSD objective of `opsd.train` (JSD, beta 0.5, on the span tokens,
  teacher = the same weights on the hinted sequence, no grad) on the same batches of examples, in fp32
  and under bf16 autocast with fp32 master weights (the matmuls in bf16; log-softmax and the divergence
  in fp32, as `opsd.train.losses` computes them). Per batch: relative loss and gradient-norm difference
  and the cosine between the two gradients.

The greedy-rollout agreement (64 BFCL tasks) is measured by bench/rollout.py on its fp32 round.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / "tests" / "fixtures" / "bfcl_rollouts.jsonl"
PREFILL = "<tool_call>\n"  # the fixture's rollouts were generated with this reply prefill


def hinted_examples(tok, limit: int | None = None):
    from opsd_critic import make_critic
    from opsd_critic.validate import check_critique
    from opsd.hint.build import build_examples
    from opsd.io.trajectories import load_trajectories

    trajs = load_trajectories(FIXTURE)[:limit]
    for t in trajs:
        if t.messages[-1]["content"].startswith(PREFILL):
            t.messages[-1]["prefill"] = PREFILL
    critic = make_critic("schema+reference")
    critiques = [check_critique(asyncio.run(critic.critique(t)), t) for t in trajs]
    examples, counts = build_examples(trajs, critiques, tok)
    return examples, dict(counts)


def _grads(lm, examples, pad_id: int, autocast_bf16: bool):
    """Loss (mean JSD over the span tokens) and the flat gradient of one batch; teacher = same weights, hinted."""
    import torch

    from opsd.train.losses import token_divergence
    from opsd.train.scoring import collate, span_logits

    lm.zero_grad(set_to_none=True)
    s = collate([e.student_ids for e in examples], [e.student_span for e in examples], pad_id=pad_id)
    t = collate([e.teacher_ids for e in examples], [e.teacher_span for e in examples], pad_id=pad_id)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        with torch.no_grad():
            teacher_NV = span_logits(lm, t.input_ids, t.attention_mask, t.batch_idx, t.pos)  # (N, V)
        student_NV = span_logits(lm, s.input_ids, s.attention_mask, s.batch_idx, s.pos)  # (N, V)
    loss = token_divergence(student_NV, teacher_NV, kind="jsd", beta=0.5).mean()  # fp32 inside
    loss.backward()
    grad = torch.cat([p.grad.flatten().float() for p in lm.parameters() if p.grad is not None])
    return loss.item(), grad


def loss_and_grad_norm(model_name: str, examples, pad_id: int, batch: int, batches: int) -> list[dict]:
    import torch

    from opsd.io import models

    lm, _ = models.load(model_name, device="cpu", dtype=torch.float32)
    lm.train()
    out = []
    for b in range(min(batches, len(examples) // batch)):
        chunk = examples[b * batch:(b + 1) * batch]
        l32, g32 = _grads(lm, chunk, pad_id, False)
        l16, g16 = _grads(lm, chunk, pad_id, True)
        n32, n16 = g32.norm().item(), g16.norm().item()
        out.append({"loss_fp32": l32, "loss_bf16": l16, "loss_rel_diff": (l16 - l32) / l32,
                    "grad_norm_fp32": n32, "grad_norm_bf16": n16, "grad_norm_rel_diff": (n16 - n32) / n32,
                    "grad_cosine": torch.nn.functional.cosine_similarity(g32.double(), g16.double(), dim=0).item(),
                    "span_tokens": sum(e.student_span[1] - e.student_span[0] for e in chunk)})
    return out


def hint_effects(model_name: str, examples, pad_id: int) -> dict:
    from opsd.hint.measure import measure
    from opsd.io import models

    out = {}
    for precision in ("fp32", "bf16"):
        lm, _ = models.load(model_name, device="cpu", precision=precision)
        t0 = time.perf_counter()
        out[precision] = [m.hint_effect for m in measure(lm, lm, examples, batch_size=8, pad_id=pad_id)]
        out[f"{precision}_s"] = time.perf_counter() - t0
    return out


def summarise(effects: dict, lg: list[dict]) -> dict:
    h32, h16 = effects["fp32"], effects["bf16"]
    diff = [b - a for a, b in zip(h32, h16)]
    absd = sorted(abs(d) for d in diff)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]
    keep32, keep16 = [h < 0 for h in h32], [h < 0 for h in h16]  # opsd train's default filter: min_hint_effect 0
    out = {"hint_effect": {"n": len(diff), "mean_fp32": statistics.fmean(h32), "mean_bf16": statistics.fmean(h16),
                           "mean_diff": statistics.fmean(diff), "abs_diff_median": q(absd, 0.5),
                           "abs_diff_p90": q(absd, 0.9), "abs_diff_max": absd[-1],
                           "spread_fp32": statistics.pstdev(h32),
                           "correlation": statistics.correlation(h32, h16) if len(h32) > 2 else None,
                           "sign_agrees": sum(k1 == k2 for k1, k2 in zip(keep32, keep16)),
                           "kept_fp32": sum(keep32), "kept_bf16": sum(keep16),
                           "kept_by_one_only": sum(k1 != k2 for k1, k2 in zip(keep32, keep16))}}
    if lg:
        out["loss_grad"] = {"batches": len(lg),
                            "loss_rel_diff_abs_max": max(abs(r["loss_rel_diff"]) for r in lg),
                            "loss_rel_diff_median": statistics.median(r["loss_rel_diff"] for r in lg),
                            "grad_norm_rel_diff_abs_max": max(abs(r["grad_norm_rel_diff"]) for r in lg),
                            "grad_norm_rel_diff_median": statistics.median(r["grad_norm_rel_diff"] for r in lg),
                            "grad_cosine_min": min(r["grad_cosine"] for r in lg),
                            "grad_cosine_median": statistics.median(r["grad_cosine"] for r in lg)}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--limit", type=int, default=None, help="first N fixture rollouts (default: all 240)")
    p.add_argument("--batch", type=int, default=4, help="examples per loss/gradient batch")
    p.add_argument("--batches", type=int, default=8, help="loss/gradient batches compared")
    p.add_argument("--quick", action="store_true", help="smoke sizes: 24 rollouts, 1 batch of 2")
    p.add_argument("--json", help="write all results here")
    a = p.parse_args(argv)
    if a.quick:
        a.limit, a.batch, a.batches = 24, 2, 1
    import torch

    from opsd.io.models import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(a.model)
    pad_id = tok.pad_token_id or 0
    t0 = time.perf_counter()
    examples, counts = hinted_examples(tok, a.limit)
    print(f"{len(examples)} hinted examples from {a.limit or 240} real rollouts ({counts})", flush=True)
    effects = hint_effects(a.model, examples, pad_id)
    lg = loss_and_grad_norm(a.model, examples, pad_id, a.batch, a.batches)
    result = {"config": {"model": a.model, "rollouts": a.limit or 240, "batch": a.batch, "batches": a.batches},
              "examples": len(examples), "build_counts": counts, "hint_effects": effects, "loss_grad": lg,
              "summary": summarise(effects, lg), "wall_s": time.perf_counter() - t0}
    h = result["summary"]["hint_effect"]
    print(f"hint effect, n={h['n']}: |bf16 - fp32| median {h['abs_diff_median']:.4f}, max {h['abs_diff_max']:.4f} nats "
          f"(spread across examples {h['spread_fp32']:.3f}); kept by one precision only: {h['kept_by_one_only']}")
    if lg:
        s = result["summary"]["loss_grad"]
        print(f"loss rel diff max {s['loss_rel_diff_abs_max']:.2%}, grad-norm rel diff max "
              f"{s['grad_norm_rel_diff_abs_max']:.2%}, grad cosine min {s['grad_cosine_min']:.4f} ({len(lg)} batches)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
