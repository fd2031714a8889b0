"""The checks that need a CUDA GPU: bf16 there, and the loss, span-scoring and teacher-reuse equalities on the GPU.

    pytest -m cuda -q                              # on a machine with a CUDA GPU (scripts/gpu_check.sh runs this)
    OPSD_TEST_DEVICE=cpu pytest -m cuda -q         # the same bodies on CPU (scripts/gpu_check.sh --dry-run)

Without CUDA (CI, the CPU machines) every test here is skipped, unless OPSD_TEST_DEVICE names another device.
The CPU suite already checks these equalities on CPU; here they are checked where the kernels differ (cuBLAS,
SDPA kernels, bf16 autocast on CUDA), against the CPU result or against the whole-sequence reference.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from opsd.io import models
from opsd.train import run as train
from opsd.train import step as train_step
from opsd.train.losses import TopK, teacher_topk, token_divergence, token_divergence_topk
from opsd.train.scoring import span_logprobs
from opsd.train.shared_prefix import Member, grouped_span_scores
from tests.conftest import tiny_llama
from tests.train.test_train_loop import cfg_for

DEVICE = os.environ.get("OPSD_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _on_device(**kw):
    """TrainConfig overrides that put a run on DEVICE (a CPU run says so; otherwise train picks CUDA itself)."""
    return {"cpu": DEVICE == "cpu"} | kw


def _losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def test_divergences_and_their_gradients_on_device_equal_cpu():
    g = torch.Generator().manual_seed(0)
    s_NV, t_NV = torch.randn(64, 4096, generator=g) * 3, torch.randn(64, 4096, generator=g) * 3
    targets = TopK(*teacher_topk(t_NV, 32))
    values = {}
    for dev in ("cpu", DEVICE):
        s = s_NV.to(dev).requires_grad_(True)
        full = token_divergence(s, t_NV.to(dev), kind="jsd", beta=0.5)  # (N,)
        top = token_divergence_topk(s, targets.to(dev), kind="jsd", beta=0.5)  # (N,)
        (full.sum() + top.sum()).backward()
        values[dev] = (full.detach().cpu(), top.detach().cpu(), s.grad.cpu())
    for a, b in zip(values["cpu"], values[DEVICE]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert values["cpu"][0].abs().min() > 1e-3  # far from 0: the comparison can fail


def test_span_scores_and_grouped_scoring_on_device_equal_cpu(smol_tok, trajectories, critiques):
    from opsd.hint.build import build_examples

    exs, _ = build_examples(trajectories, critiques, smol_tok)
    exs = exs[:4]
    ids, spans = [e.student_ids for e in exs], [tuple(e.student_span) for e in exs]
    model = tiny_llama(len(smol_tok), seed=4)
    cpu = span_logprobs(model, ids, spans, top_k=8, pad_id=2)
    model.to(DEVICE)
    dev = span_logprobs(model, ids, spans, top_k=8, pad_id=2)
    for a, b in zip(cpu.token_logprobs, dev.token_logprobs):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # the shared prompt run once (student rows + hinted sequence in one group) equals whole-sequence scoring
    groups = [[Member(e.student_ids, tuple(e.student_span), rows=True), Member(e.teacher_ids, tuple(e.teacher_span))]
              for e in exs]
    for g, scores in zip(groups, grouped_span_scores(model, groups, batch_size=2, pad_id=2)):
        for m, x in zip(g, scores):
            ref = span_logprobs(model, [m.ids], [m.span], return_rows=m.rows, pad_id=2)
            torch.testing.assert_close(x.cpu(), (ref.rows if m.rows else ref.token_logprobs)[0], atol=1e-4, rtol=1e-4)


def test_teacher_targets_from_the_student_cache_equal_a_whole_hinted_pass_on_device(tiny_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = cfg_for(tiny_dir, out, **_on_device(teacher="self"))
    s = train.setup(cfg)
    assert s.accelerator.device.type == DEVICE
    records, _ = train.data_sources(cfg, s, out)
    state = train.start(cfg, s, records)
    mb = train_step.make_micro_batch(records[:4], state.pad_id)
    assert train_step.reuses_student_kv(state, mb)
    whole = train_step.targets(state.teacher, mb).logits_NV
    cache = DynamicCache()
    state.student.logits(mb.student, cache)
    got = state.teacher.logits_after_student(cache, records[:4], state.pad_id)
    assert got.device.type == DEVICE
    torch.testing.assert_close(got, whole, atol=1e-4, rtol=1e-4)


def test_training_with_teacher_reuse_equals_training_without_on_device(tiny_dir, tmp_path):
    a = train.main(cfg_for(tiny_dir, tmp_path / "a", **_on_device(teacher="self")))
    b = train.main(cfg_for(tiny_dir, tmp_path / "b", **_on_device(teacher="self", teacher_reuses_prefix=False)))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)
    la, lb = _losses(a.parent), _losses(b.parent)
    assert len(la) == len(lb) == 3
    for x, y in zip(la, lb):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-3, abs=1e-6)


def test_bf16_training_on_device_keeps_fp32_weights_and_matches_fp32(tiny_dir, smol_tok, tmp_path):
    from tests.conftest import save_tiny

    if DEVICE == "cuda":
        assert models.resolve_precision("auto", "cuda") == "bf16"  # what `auto` trains and rolls out at on a GPU
    teacher = save_tiny(tmp_path / "teacher", smol_tok, seed=9)  # an external teacher: a divergence far from 0
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        model = train.main(cfg_for(tiny_dir, out, **_on_device(precision=precision, teacher="external",
                                                              teacher_model=str(teacher))))
        runs[precision] = ([r["train/loss"] for r in _losses(out)], load_file(model / "model.safetensors"))
    (l32, w32), (l16, w16) = runs["fp32"], runs["bf16"]
    assert all(w.dtype == torch.float32 for w in w16.values())  # fp32 master weights are what is saved
    for x, y in zip(l32, l16):
        assert abs(x - y) <= 0.02 * abs(x), (l32, l16)
    assert any(not torch.equal(w16[k], w32[k]) for k in w32)  # bf16 autocast really ran


def test_embedded_model_in_bf16_on_device_agrees_with_fp32(smol_tok, trajectories, critiques):
    from opsd.hint.build import build_examples

    exs, _ = build_examples(trajectories, critiques, smol_tok)
    ids = [e.student_ids for e in exs[:4]]
    spans = [(max(1, len(x) - 64), len(x)) for x in ids]  # the last 64 tokens of real trajectories
    lp = {}
    for precision in ("fp32", "bf16"):
        model, _ = models.load(models.DEFAULT_MODEL, device=DEVICE, precision=precision)
        assert models.precision_of(model) == precision and model.device.type == DEVICE
        lp[precision] = torch.cat(span_logprobs(model, ids, spans, pad_id=smol_tok.pad_token_id or 0).token_logprobs)
        del model
    diff = (lp["bf16"] - lp["fp32"]).abs()
    print(f"bf16 vs fp32 on {DEVICE}: median |diff| {diff.median():.4f}, max {diff.max():.4f} nats, n={diff.numel()}")
    assert diff.median() < 0.05 and diff.max() < 1.0  # BENCHMARKS §9 on CPU: median 0.018, max 0.238 (hint effects)
    assert lp["fp32"].mean() > -3.0  # the real model, not random weights (a random one scores ~ -10.8 nats/token)
