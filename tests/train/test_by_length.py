"""Micro-batches run as pieces of similar length (`opsd.train.step.by_length`): less padding, the same update."""
from __future__ import annotations

import json

import pytest
import torch

from opsd.train import run as train
from opsd.train import step as train_step
from opsd.train.records import TrainRecord
from tests.train.test_train_loop import cfg_for, weights


def _rec(i: int, n: int) -> TrainRecord:
    ids = list(range(1, n + 1))
    return TrainRecord(f"r{i}", ids, (n - 2, n), ids, (n - 2, n))


def test_pieces_are_sorted_cover_every_record_once_and_pad_at_most_the_slack():
    recs = [_rec(i, n) for i, n in enumerate([300, 900, 410, 880, 250, 700, 260, 420])]
    pieces = train_step.by_length(recs, 1.25)
    assert sorted(r.id for p in pieces for r in p) == sorted(r.id for r in recs)
    lengths = [[len(r.student_ids) for r in p] for p in pieces]
    assert lengths == [
        [900, 880], [700], [420, 410], [300, 260, 250]]
    assert all(min(p) * 1.25 >= max(p) for p in lengths)
    assert train_step.by_length(recs, float("inf")) == [sorted(recs, key=lambda r: -len(r.student_ids))]
    assert train_step.by_length([]) == []


def test_training_in_pieces_equals_training_on_the_whole_micro_batches(tiny_dir, tmp_path, monkeypatch):
    seen = []
    split = train_step.by_length
    monkeypatch.setattr(train_step, "by_length", lambda recs: seen.append(len(split(recs))) or split(recs))
    a = train.main(cfg_for(tiny_dir, tmp_path / "a", batch_size=4, teacher="self"))
    assert max(seen) > 1  # some micro-batch of the fixture's logs really ran in pieces
    seen.clear()
    monkeypatch.setattr(train_step, "PAD_SLACK", float("inf"))
    b = train.main(cfg_for(tiny_dir, tmp_path / "b", batch_size=4, teacher="self"))
    assert max(seen) == 1
    wa, wb = weights(a.parent), weights(b.parent)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    rows = [[json.loads(x) for x in (p.parent / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
            for p in (a, b)]
    assert len(rows[0]) == len(rows[1]) == 3
    for x, y in zip(*rows):
        for k in ("train/loss", "train/span_tokens", "teacher/hint_effect", "train/grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
