"""precision=bf16: bf16 autocast for the matmuls, fp32 master weights and optimizer state, fp32 loss math."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from opsd.train import run as train
from opsd.train import step as train_step
from tests.conftest import save_tiny
from tests.train.test_train_loop import cfg_for

# Tolerances for a tiny Llama, 3 steps, lr 1e-3, an external teacher of another seed (a divergence far from 0;
# the self teacher's ~5e-7 is all rounding): see the printed values.
LOSS_RTOL, UPDATE_RTOL = 0.02, 0.1


def run(tiny_dir, out, precision, teacher_dir):
    train.main(cfg_for(tiny_dir, out, precision=precision, teacher="external", teacher_model=str(teacher_dir)))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    return [r["train/loss"] for r in rows], load_file(out / "model" / "model.safetensors")


def test_bf16_matches_fp32_and_keeps_fp32_weights(tiny_dir, smol_tok, tmp_path):
    start = load_file(tiny_dir / "model.safetensors")
    teacher = save_tiny(tmp_path / "teacher", smol_tok, seed=9)
    loss32, w32 = run(tiny_dir, tmp_path / "fp32", "fp32", teacher)
    loss16, w16 = run(tiny_dir, tmp_path / "bf16", "bf16", teacher)
    print(f"losses fp32 {loss32} bf16 {loss16}")
    for a, b in zip(loss32, loss16):
        assert abs(a - b) <= LOSS_RTOL * abs(a), (loss32, loss16)
    assert all(w.dtype == torch.float32 for w in w16.values())  # fp32 master weights are what is saved
    d32 = torch.cat([(w32[k] - start[k]).flatten() for k in start])
    d16 = torch.cat([(w16[k] - start[k]).flatten() for k in start])
    rel = ((d16 - d32).norm() / d32.norm()).item()
    print(f"update difference bf16 vs fp32: {rel:.4f} (relative L2)")
    assert d32.norm() > 0 and rel < UPDATE_RTOL
    assert not torch.equal(d16, d32)  # bf16 really ran: the rounding differs


def test_bf16_autocasts_the_forward_only(tiny_dir, tmp_path):
    """Under bf16 the student's logits come out of bf16 matmuls; parameters and Adam moments stay fp32."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = cfg_for(tiny_dir, out, precision="bf16", teacher="self")
    s = train.setup(cfg)
    records, _ = train.data_sources(cfg, s, out)
    state = train.start(cfg, s, records)
    mb = train_step.make_micro_batch(records[:2], state.pad_id)
    seen = []
    inner = state.student.lm.model.layers[0].mlp.down_proj
    hook = inner.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    logits = state.student.logits(mb.student)
    hook.remove()
    assert seen == [torch.bfloat16]  # the decoder's matmuls ran in bf16
    assert logits.dtype == torch.float32  # the head runs in the fp32 master weights' precision
    obj, _ = train_step.loss(state.student, mb, train_step.targets(state.teacher, mb), cfg)
    assert obj.dtype == torch.float32  # log-softmax and the divergence in fp32
    train_step.train_step(state, 0)
    assert all(p.dtype == torch.float32 for p in state.student.lm.parameters())
    moments = [v for st in state.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    assert moments and all(m.dtype == torch.float32 for m in moments)


def test_bf16_teacher_samples_with_a_shared_prefix(tiny_dir, smol_tok):
    """Decoding under bf16 autocast (the OPSD cold start's hinted-teacher continuations, GKD's samples) with prompts
    that share a prefix: the prefilled keys come out fp32 (RoPE's fp32 cos/sin) and the values bf16, and both are
    written into one cache; it must decode what it decodes in fp32, not fail on the dtypes (it raised 'Index put
    requires the source and destination dtypes match' in the demo's rounds with --train.cold-start-sft)."""
    from opsd.io import models
    from opsd.rollout.hf import MIN_SHARED_PREFIX, generate_batch

    lm, _ = models.load(str(tiny_dir), device="cpu", precision="fp32")
    shared = list(range(100, 100 + MIN_SHARED_PREFIX + 4))
    prompts = [shared + [7, 8, 9], shared + [11], shared + [12, 13]]
    kw = dict(max_new_tokens=5, stop_text=[None] * 3)
    fp32 = generate_batch(lm, smol_tok, prompts, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = generate_batch(lm, smol_tok, prompts, **kw)
    assert [len(ids) for ids, _ in bf16] == [len(ids) for ids, _ in fp32] and all(ids for ids, _ in bf16)
    agree = sum(a == b for (x, _), (y, _) in zip(fp32, bf16) for a, b in zip(x, y))
    assert agree >= 0.6 * sum(len(x) for x, _ in fp32), (fp32, bf16)  # a random tiny model: rounding may flip some
