"""TrainConfig refuses settings that cannot run, and the precision `auto` picks does not depend on the device for GKD."""
from __future__ import annotations

import pytest

from opsd.io import models
from opsd.train.config import TrainConfig
from opsd.train.run import train_precision


@pytest.mark.parametrize("mode", ["sft", "reinforce", "opsd"])
def test_seq_kd_outside_gkd_is_refused_up_front(mode):
    # sft used to pass validation and crash at step 1 in teacher_samples(teacher=None); opsd/reinforce ignored it
    with pytest.raises(ValueError, match=rf"seq_kd .* GKD option; mode={mode}"):
        TrainConfig(mode=mode, trajectories="t.jsonl", critiques="c.jsonl" if mode == "opsd" else "", seq_kd=True)
    TrainConfig(mode=mode, trajectories="t.jsonl", critiques="c.jsonl" if mode == "opsd" else "")  # fine without


def test_seq_kd_with_gkd_is_accepted():
    assert TrainConfig(mode="gkd", trajectories="t.jsonl", seq_kd=True).is_gkd
    assert TrainConfig(trajectories="t.jsonl", seq_kd=True).is_gkd  # auto without critiques = gkd


def test_auto_trains_gkd_in_fp32_on_every_device(monkeypatch):
    monkeypatch.setattr(models, "resolve_precision", lambda p, d=None: "bf16" if p == "auto" else p)  # bf16 units
    gkd, opsd = TrainConfig(mode="gkd"), TrainConfig(mode="opsd")
    for device in ("cpu", "cuda"):
        assert train_precision(gkd, device) == "fp32", device
        assert train_precision(opsd, device) == "bf16", device
    assert train_precision(TrainConfig(mode="gkd", precision="bf16"), "cuda") == "bf16"  # asked for: given
