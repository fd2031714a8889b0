"""Stage outputs written as `datasets` folders too (`--datasets-out`): rollout and critique, exact round trip."""
from __future__ import annotations

import datasets
import pytest

from opsd.critique.config import CritiqueConfig
from opsd.critique.run import main as critique_main
from opsd.io.records import read_jsonl, read_latest, read_records
from opsd.io.trajectories import load_trajectories
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import load_rollouts
from opsd.rollout.run import main as rollout_main
from tests.conftest import TRAJECTORIES


def test_critique_stage_writes_a_datasets_folder(tmp_path):
    out, folder = tmp_path / "c.jsonl", tmp_path / "critiques_ds"
    critique_main(CritiqueConfig(inputs=[str(TRAJECTORIES)], out=str(out), progress=False, datasets_out=str(folder)))
    jsonl = list(read_jsonl(out))
    assert len(jsonl) == 8 and list(read_records(folder)) == jsonl  # same records, same order, nothing added
    assert datasets.load_from_disk(str(folder)).num_rows == 8  # a plain datasets folder
    # a rerun resumes the JSONL (nothing appended) and rewrites the folder with the same records
    critique_main(CritiqueConfig(inputs=[str(TRAJECTORIES)], out=str(out), progress=False, datasets_out=str(folder)))
    assert list(read_jsonl(out)) == jsonl and list(read_records(folder)) == read_latest(out)


def test_datasets_out_must_be_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="datasets_out: .* is a file; a datasets output is a folder"):
        CritiqueConfig(inputs=[str(TRAJECTORIES)], datasets_out=str(tmp_path / "f"))
    with pytest.raises(ValueError, match="datasets_out: .* is a file"):
        RolloutConfig(datasets_out=str(tmp_path / "f"))


def test_rollout_stage_writes_a_datasets_folder(tiny_model_dir, tmp_path):
    cfg = RolloutConfig(tasks="bfcl:simple_python:train", out=str(tmp_path / "r.jsonl"), model=str(tiny_model_dir),
                        limit=2, max_new_tokens=4, batch_size=2, device="cpu", precision="fp32",
                        datasets_out=str(tmp_path / "r_ds"))
    rollout_main(cfg)
    trajs = load_rollouts(cfg)
    assert len(trajs) == 2
    assert [t.to_dict() for t in load_trajectories(tmp_path / "r_ds")] == [t.to_dict() for t in trajs]
