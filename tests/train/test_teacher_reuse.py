"""teacher=self starting from the student's keys/values: the same targets and the same training as a whole
hinted pass, with fewer tokens run."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from opsd.train import run as train
from opsd.train import step as train_step
from opsd.train.shared_prefix import common_prefix, logits_after_student
from tests.train.test_train_loop import cfg_for, weights


def _state(tiny_dir, out, **kw):
    cfg = cfg_for(tiny_dir, out, **({"teacher": "self"} | kw))
    out.mkdir(parents=True)
    s = train.setup(cfg)
    records, _ = train.data_sources(cfg, s, out)
    return train.start(cfg, s, records), records


def test_targets_from_the_student_cache_equal_a_whole_hinted_pass(tiny_dir, tmp_path):
    state, records = _state(tiny_dir, tmp_path / "run")
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
    assert got.shape == whole.shape and not got.requires_grad
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
    # a cache from other tokens (the rows in another order) gives other targets (the test can fail)
    other = DynamicCache()
    state.student.logits(train_step.make_micro_batch(recs[::-1], state.pad_id).student, other)
    wrong = logits_after_student(state.student.lm, other, [r.student_ids for r in recs],
                                 [r.teacher_ids for r in recs], [tuple(r.teacher_span) for r in recs], state.pad_id)
    assert (wrong.float() - whole).abs().max() > 1e-3


def test_training_with_reuse_equals_training_without(tiny_dir, tmp_path):
    a = train.main(cfg_for(tiny_dir, tmp_path / "a", teacher="self"))
    b = train.main(cfg_for(tiny_dir, tmp_path / "b", teacher="self", teacher_reuses_prefix=False))
    wa, wb = weights(a.parent), weights(b.parent)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    rows = [[json.loads(x) for x in (p.parent / "metrics.jsonl").read_text().splitlines()] for p in (a, b)]
    steps = [[r for r in rs if "train/loss" in r] for rs in rows]
    assert len(steps[0]) == len(steps[1]) == 3
    for x, y in zip(*steps):
        for k in ("train/loss", "teacher/hint_effect", "train/grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("kw", [dict(teacher_reuses_prefix=False), dict(gradient_checkpointing=True),
                                dict(teacher="initial", lora_r=4)])
def test_reuse_is_off_where_keys_values_differ(tiny_dir, tmp_path, kw):
    state, records = _state(tiny_dir, tmp_path / "run", **kw)
    assert not train_step.reuses_student_kv(state, train_step.make_micro_batch(records[:2], state.pad_id))


def test_reuse_is_off_with_dropout(tiny_dir, tmp_path):
    state, records = _state(tiny_dir, tmp_path / "run")
    state.student.lm.config.attention_dropout = 0.1
    assert not train_step.reuses_student_kv(state, train_step.make_micro_batch(records[:2], state.pad_id))
