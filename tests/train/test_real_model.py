"""The real embedded SmolLM2-135M: a short OPSD run on the sample critiques lowers the error tokens."""
from __future__ import annotations

import json

import pytest
import torch

from opsd.io.models import load
from opsd.train import run as train
from opsd.train.config import TrainConfig
from opsd.train.scoring import span_logprobs
from tests.conftest import CRITIQUES, TRAJECTORIES


def error_logprobs(model, recs):
    """Mean log-prob of the quoted error tokens per example, without the hint."""
    s = span_logprobs(model, [r["student_ids"] for r in recs], [tuple(r["meta"]["quote_span"]) for r in recs], batch_size=4)
    return torch.stack([x.mean() for x in s.token_logprobs])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_run_lowers_error_tokens(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(trajectories=str(TRAJECTORIES), critiques=str(CRITIQUES), out=str(out), max_steps=3, batch_size=4,
                 lr=1e-4, warmup_steps=0, schedule="constant", progress=False)
    train.main(cfg)
    data = json.loads((out / "data.json").read_text())
    assert data["built"] == 6 and data["skipped"] == {"verdict_ok": 2}
    recs = [json.loads(l) for l in (out / "examples.jsonl").read_text().splitlines()]
    assert len(recs) == data["kept"] >= 3 and all(r["hint_effect"] < 0 for r in recs)  # default filter: hint must lower
    before_model, _ = load("smollm2-135m-instruct", device="cpu")
    before = error_logprobs(before_model, recs)
    del before_model
    after_model, _ = load(out / "model", device="cpu")
    after = error_logprobs(after_model, recs)
    drop = (before - after)  # > 0: the error got less likely
    print(f"error-token log-prob before {before.tolist()} after {after.tolist()} mean drop {drop.mean():.3f}")
    # measured (bf16 autocast, top-k 256 targets from the frozen initial teacher): drops 3.89, 6.29, -0.31 nats
    # (mean 3.29; the third error token was already at log-prob -6.9, and the student moves to the hinted
    # teacher's distribution, not below it); a run that does not train, or trains towards the unhinted model,
    # leaves them all near 0
    assert int((drop > 0.5).sum()) >= 2
    assert drop.mean() > 2.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_model_trained_from_the_default_keeps_its_prefill(tmp_path):
    """Train one step from the embedded default, then roll out from RUN/model with no prefill flag: the
    `<tool_call>\n` prefill travels with the model (it answered in prose without it, issue 10 item 10)."""
    from opsd.io.trajectories import load_trajectories
    from opsd.rollout.config import RolloutConfig
    from opsd.rollout.run import main as rollout_main

    out = tmp_path / "run"
    cfg = TrainConfig(trajectories=str(TRAJECTORIES), critiques=str(CRITIQUES), out=str(out), max_steps=1, batch_size=1,
                      top_k=16, min_hint_effect=float("-inf"), progress=False)
    dest = train.main(cfg)
    rollouts = tmp_path / "rollouts.jsonl"
    rollout_main(RolloutConfig(model=str(dest), tasks="bfcl:simple_python:train", limit=2, max_new_tokens=8,
                               out=str(rollouts)))
    trajs = load_trajectories(rollouts)
    assert len(trajs) == 2
    for t in trajs:
        reply = t.messages[-1]
        assert reply["role"] == "assistant" and reply.get("prefill") == "<tool_call>\n", reply
        assert reply["content"].startswith("<tool_call>\n")
