"""Context distillation with the real SmolLM2-135M: an external teacher (the same model) that gets a system
instruction the student lacks; GKD on the dataset replies lowers the teacher-student divergence."""
from __future__ import annotations

import json

import pytest

from opsd.train import run as train
from opsd.train.config import TrainConfig
from opsd.train.diagnostics import summarise
from tests.conftest import TRAJECTORIES


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_context_distillation_lowers_the_divergence(tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "four.jsonl"
    data.write_text("".join(TRAJECTORIES.read_text().splitlines(keepends=True)[:4]))
    cfg = TrainConfig(trajectories=str(data), out=str(out), teacher="external", teacher_model="smollm2-135m-instruct",
                 teacher_system="Do not call any tool. Answer the user directly, in French.", lmbda=0.0, loss="jsd",
                 beta=0.5, max_steps=3, batch_size=4, lr=1e-5, schedule="constant", progress=False)
    assert cfg.is_gkd
    train.main(cfg)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    loss = [r["train/loss"] for r in rows]  # step k's loss is measured before its update: the same 4 replies each step
    kl = [r["diag/kl"] for r in rows]
    print(f"JSD per step {loss}; KL(student||teacher) {kl}; top-16 overlap {[r['diag/top16_overlap'] for r in rows]}")
    assert loss[0] > 0.001  # the instruction really changes the teacher
    # measured: fp32 (auto's choice for GKD on CPU) JSD 0.0043 -> 0.0032 -> 0.0026; under bf16 autocast it ROSE
    # to 0.0094 (why precision=auto trains GKD in fp32 on CPU)
    assert loss[1] < loss[0] and loss[2] < loss[0] and kl[2] < kl[0]
    sm = summarise(out / "metrics.jsonl")
    assert sm["steps"] == 3 and sm["diag/kl"]["last"] == kl[2]
