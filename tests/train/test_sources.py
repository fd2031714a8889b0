"""Data sources: examples longer than the model's context are skipped with a counted reason (issue 11)."""
from __future__ import annotations

import json

from opsd.hint.build import build_examples
from opsd.train import run as train
from opsd.train import sources
from tests.conftest import tiny_llama
from tests.train.test_gkd import gkd_cfg
from tests.train.test_train_loop import cfg_for


def tiny_with_context(path, tok, limit: int):
    model = tiny_llama(len(tok))
    model.config.max_position_embeddings = limit
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_opsd_examples_longer_than_the_context_are_skipped(tmp_path, smol_tok, trajectories, critiques):
    exs, _ = build_examples(trajectories, critiques, smol_tok)
    lengths = sorted(max(len(e.student_ids), len(e.teacher_ids)) for e in exs)
    limit = lengths[len(lengths) // 2]  # about half of them fit
    n_long = sum(n > limit for n in lengths)
    assert 0 < n_long < len(exs)
    model = tiny_with_context(tmp_path / "short", smol_tok, limit)
    out = tmp_path / "run"
    train.main(cfg_for(model, out, max_steps=1))
    data = json.loads((out / "data.json").read_text())
    assert data["skipped"]["too_long"] == n_long and data["built"] == len(exs) - n_long
    recs = [json.loads(l) for l in (out / "examples.jsonl").read_text().splitlines()]
    assert recs and all(max(len(r["student_ids"]), len(r["teacher_ids"])) <= limit for r in recs)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["data/skipped_too_long"] == n_long


def test_gkd_records_longer_than_the_context_are_skipped(tmp_path, smol_tok, trajectories):
    recs, _ = sources.build_records(trajectories, smol_tok)
    lengths = sorted(len(r.student_ids) for r in recs)
    limit = lengths[len(lengths) // 2]
    n_long = sum(n > limit for n in lengths)
    assert 0 < n_long < len(recs)
    model = tiny_with_context(tmp_path / "short", smol_tok, limit)
    out = tmp_path / "run"
    train.main(gkd_cfg(model, out, teacher="external", teacher_model=str(model), max_steps=1))
    data = json.loads((out / "data.json").read_text())
    assert data["skipped"]["too_long"] == n_long and data["kept"] == len(recs) - n_long
