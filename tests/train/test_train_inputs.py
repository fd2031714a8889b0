"""`opsd train` reads several log and critique files and skips bad records with --rejects."""
from __future__ import annotations

import json

from opsd.train.config import TrainConfig
from tests.hint.test_hint_inputs import split_inputs


def test_train_takes_several_inputs_and_rejects(tiny_model_dir, tmp_path, capsys):
    from opsd.cli import main

    a, b, ca, cb = split_inputs(tmp_path)
    rejects = tmp_path / "out" / "rejects.jsonl"
    rc = main(["train", "--trajectories", a, b, "--critiques", ca, cb, "--rejects", str(rejects),
               "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2",
               "--min-hint-effect", "-inf", "--precision", "fp32", "--cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["critiques"] == 8 and data["built"] == 6
    assert len(rejects.read_text().splitlines()) == 1


def test_one_path_is_still_accepted():
    cfg = TrainConfig(trajectories="t.jsonl", critiques="c.jsonl")
    assert cfg.trajectories == ["t.jsonl"] and cfg.critiques == ["c.jsonl"] and not cfg.is_gkd
    assert TrainConfig(trajectories=["t.jsonl"]).is_gkd
