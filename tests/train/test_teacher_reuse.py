"""teacher=self starting from the student's keys/values: the same targets and the same training as a whole
hinted pass, with fewer tokens run; in fp32 and under bf16 autocast (precision=bf16: fp32 master weights, the
forwards autocast to bf16 by the accelerator, the head in fp32)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from opsd.train import run as train
from opsd.train import step as train_step
from opsd.train.scoring import eval_mode, span_logits
from opsd.train.shared_prefix import common_prefix, logits_after_student
from tests.train.test_shared_prefix import BF16_MAX, BF16_MEAN, sharp_llama
from tests.train.test_train_loop import cfg_for, weights

# bf16: the reused and the whole hinted pass run matmuls of other shapes, so they agree to bf16's rounding. Measured
# (2026-12-07, an AVX512-BF16 CPU, the first 4 records as below, tiny Llamas of seeds 0-5 with and without the
# sharpened attention of `sharp_llama`), |reused - whole| of the target logits: fp32 max <= 1.8e-7; bf16 max 0 (bit-
# equal) in 11 of 12 models, 1.3e-4 (mean 1.8e-6) in one; bf16 vs fp32 of the whole pass itself: max 3.9e-4..8.0e-4,
# mean 5.4e-5..8.1e-5; a cache from the rows in another order: max 5.7e-2 (6.6e-2 sharpened). The targets use the
# shared-prefix test's BF16_MAX = 2e-3 / BF16_MEAN = 3e-5 (a teacher pass run outside autocast measured
# 6.3e-5..6.9e-5 mean: it fails).
# Three training steps, relative L2 of (update with reuse - update without), both bf16: 0 in 6 of 7 models, at most
# 9.1e-4; bf16 vs fp32 of the same run: 2.6e-2..5.2e-2. Logged metrics differ by at most 1.7e-2 (relative, the hint
# effect of step 3 after the weights moved apart by that 9.1e-4). Tolerances: 5e-3 (5.5x the largest measured, and
# 5x below the smallest change bf16 itself makes) and 0.05 (3x the largest measured: this catches gross errors
# only; the targets test above catches the fine ones).
BF16_UPDATE_REL, BF16_METRICS_REL = 5e-3, 0.05


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory, smol_tok):
    """A tiny Llama with the attention of `sharp_llama` (a position off by one shows above bf16's rounding)."""
    path = tmp_path_factory.mktemp("sharp") / "model"
    sharp_llama(len(smol_tok), seed=0).save_pretrained(path)
    smol_tok.save_pretrained(path)
    return path


def _state(tiny_dir, out, **kw):
    cfg = cfg_for(tiny_dir, out, **({"teacher": "self"} | kw))
    out.mkdir(parents=True)
    s = train.setup(cfg)
    records, _ = train.data_sources(cfg, s, out)
    return train.start(cfg, s, records), records


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_targets_from_the_student_cache_equal_a_whole_hinted_pass(sharp_dir, tmp_path, precision):
    state, records = _state(sharp_dir, tmp_path / "run", precision=precision)
    assert state.student.accelerator.mixed_precision == ("bf16" if precision == "bf16" else "no")
    recs = records[:4]
    # one record whose teacher shares nothing with its student (an instructed teacher's system prompt, say)
    first = recs[0]
    recs[0] = type(first)(**{**first.__dict__, "teacher_ids": [7] + list(first.teacher_ids),
                             "teacher_span": (first.teacher_span[0] + 1, first.teacher_span[1] + 1)})
    assert common_prefix(recs[0].student_ids, recs[0].teacher_ids, 10**9) == 0
    assert all(common_prefix(r.student_ids, r.teacher_ids, r.teacher_span[0] - 1) > 20 for r in recs[1:])
    mb = train_step.make_micro_batch(recs, state.pad_id)
    assert train_step.reuses_student_kv(state, mb)
    whole = train_step.targets(state.teacher, mb).logits_NV
    cache = DynamicCache()
    student_NV = state.student.logits(mb.student, cache)
    assert student_NV.requires_grad
    got = state.teacher.logits_after_student(cache, recs, state.pad_id)
    assert got.shape == whole.shape and not got.requires_grad and got.dtype == whole.dtype == torch.float32
    if precision == "fp32":
        torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
    else:
        lm, t = state.student.lm, mb.teacher
        with torch.no_grad(), eval_mode(lm):  # the whole hinted pass without autocast: what bf16 itself changes
            whole32 = span_logits(lm, t.input_ids, t.attention_mask, t.batch_idx, t.pos)
        assert (whole - whole32).abs().mean() > 2 * BF16_MEAN  # bf16 really ran
        d = (got - whole).abs()
        assert d.max() <= BF16_MAX and d.mean() <= BF16_MEAN, (d.max().item(), d.mean().item())
    # a cache from other tokens (the rows in another order) gives other targets (the test can fail)
    other = DynamicCache()
    state.student.logits(train_step.make_micro_batch(recs[::-1], state.pad_id).student, other)
    with state.student.accelerator.autocast():
        wrong = logits_after_student(state.student.lm, other, [r.student_ids for r in recs],
                                     [r.teacher_ids for r in recs], [tuple(r.teacher_span) for r in recs], state.pad_id)
    assert (wrong.float() - whole).abs().max() > 10 * BF16_MAX


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_with_reuse_equals_training_without(tiny_dir, tmp_path, precision):
    a = train.main(cfg_for(tiny_dir, tmp_path / "a", teacher="self", precision=precision))
    b = train.main(cfg_for(tiny_dir, tmp_path / "b", teacher="self", teacher_reuses_prefix=False, precision=precision))
    wa, wb = weights(a.parent), weights(b.parent)
    if precision == "fp32":
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    else:
        w0 = load_file(tiny_dir / "model.safetensors")  # the start: compare the updates
        ua = torch.cat([(wa[k] - w0[k]).flatten() for k in w0])
        ub = torch.cat([(wb[k] - w0[k]).flatten() for k in w0])
        assert ub.norm() > 0 and (ua - ub).norm() <= BF16_UPDATE_REL * ub.norm(), ((ua - ub).norm() / ub.norm()).item()
    rows = [[json.loads(x) for x in (p.parent / "metrics.jsonl").read_text().splitlines()] for p in (a, b)]
    steps = [[r for r in rs if "train/loss" in r] for rs in rows]
    assert len(steps[0]) == len(steps[1]) == 3
    rel, abs_ = (1e-4, 1e-6) if precision == "fp32" else (BF16_METRICS_REL, 0.0)
    for x, y in zip(*steps):
        for k in ("train/loss", "teacher/hint_effect", "train/grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=rel, abs=abs_), k


@pytest.mark.parametrize("kw", [dict(teacher_reuses_prefix=False), dict(gradient_checkpointing=True),
                                dict(teacher="initial", lora_r=4)])
def test_reuse_is_off_where_keys_values_differ(tiny_dir, tmp_path, kw):
    state, records = _state(tiny_dir, tmp_path / "run", **kw)
    assert not train_step.reuses_student_kv(state, train_step.make_micro_batch(records[:2], state.pad_id))


def test_reuse_is_off_with_dropout(tiny_dir, tmp_path):
    state, records = _state(tiny_dir, tmp_path / "run")
    state.student.lm.config.attention_dropout = 0.1
    assert not train_step.reuses_student_kv(state, train_step.make_micro_batch(records[:2], state.pad_id))
