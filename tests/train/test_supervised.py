"""mode=sft and mode=reinforce (the `rft`, `sft-gt` and `reward` baselines of `opsd compare`), on a tiny random Llama."""
from __future__ import annotations

import json

import pytest

from opsd.io.trajectories import load_trajectories
from opsd.train import run as train
from opsd.train import sources
from opsd.train.config import TrainConfig
from opsd.train.scoring import span_logprobs
from opsd.types import Trajectory
from tests.conftest import TRAJECTORIES


def cfg(model_dir, trajs, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), trajectories=str(trajs), out=str(out), max_steps=4, batch_size=4, lr=3e-3,
                progress=False, seed=0, precision="fp32", schedule="constant")
    return TrainConfig(**{**base, **kw})


def write(trajs: list[Trajectory], path) -> str:
    path.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in trajs))
    return str(path)


def reply_logprobs(model_dir, trajs_path, tok) -> list[float]:
    """Summed log-prob of every trajectory's last reply under the model at `model_dir`."""
    from opsd.io import models

    lm, _ = models.load(str(model_dir), device="cpu", precision="fp32")
    recs, _ = sources.build_records(load_trajectories(trajs_path), tok)
    res = span_logprobs(lm, [r.student_ids for r in recs], [r.student_span for r in recs])
    return [x.sum().item() for x in res.token_logprobs]


def with_rewards(trajs, rewards, task_ids):
    return [Trajectory(t.id, t.messages, t.tools, {**t.meta, "reward": r, "task_id": g})
            for t, r, g in zip(trajs, rewards, task_ids)]


def test_sft_raises_the_replies_and_needs_no_teacher(tiny_dir, tmp_path, smol_tok):
    c = cfg(tiny_dir, TRAJECTORIES, tmp_path / "sft", mode="sft")
    assert c.is_supervised and not c.teacher_in_loop and not c.precompute and not c.is_gkd
    before = reply_logprobs(tiny_dir, TRAJECTORIES, smol_tok)
    model = train.main(c)
    after = reply_logprobs(model, TRAJECTORIES, smol_tok)
    assert all(a > b for a, b in zip(after, before)), (before, after)
    rows = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["source/sft"] for r in steps] == [1, 2, 3, 4]
    assert all(r["train/sft_nll"] > 0 and r["train/loss"] == 0.0 for r in steps)  # no teacher, no divergence
    assert steps[-1]["train/sft_nll"] < steps[0]["train/sft_nll"]


def test_reinforce_moves_replies_by_their_advantage(tiny_dir, tmp_path, smol_tok):
    trajs = load_trajectories(TRAJECTORIES)[:4]
    # task a: reply 0 rewarded, reply 1 not; task b: both rewarded (advantage 0: no signal, dropped)
    path = write(with_rewards(trajs, [1.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"]), tmp_path / "r.jsonl")
    records, report = sources.build_supervised(cfg(tiny_dir, path, tmp_path / "x", mode="reinforce"), smol_tok)
    assert [r.advantage for r in records] == [0.5, -0.5]
    assert report["kept"] == 2 and report["skipped"]["zero_advantage"] == 2 and report["tasks"] == 2
    before = reply_logprobs(tiny_dir, path, smol_tok)
    model = train.main(cfg(tiny_dir, path, tmp_path / "rl", mode="reinforce", lr=1e-3))
    after = reply_logprobs(model, path, smol_tok)
    assert after[0] > before[0] and after[1] < before[1], (before, after)
    rows = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    assert [r["source/reinforce"] for r in rows] == [1, 2, 3, 4]


def test_reinforce_needs_a_number_reward(tiny_dir, tmp_path, smol_tok):
    trajs = load_trajectories(TRAJECTORIES)[:2]
    path = write(with_rewards(trajs, [1.0, "yes"], ["a", "a"]), tmp_path / "r.jsonl")
    with pytest.raises(ValueError, match=r"r\.jsonl: trajectory 'weather-unknown-tool': .*meta\.reward.*'yes'"):
        sources.build_supervised(cfg(tiny_dir, path, tmp_path / "x", mode="reinforce"), smol_tok)
    path = write(trajs, tmp_path / "none.jsonl")  # no reward at all
    with pytest.raises(ValueError, match="meta.reward"):
        sources.build_supervised(cfg(tiny_dir, path, tmp_path / "x", mode="reinforce"), smol_tok)


def test_supervised_modes_refuse_gkd_options(tiny_dir, tmp_path):
    for kw in ({"cold_start_sft": 2}, {"lmbda": 0.5}, {"select_prompts": True}):
        with pytest.raises(ValueError, match="do not apply"):
            cfg(tiny_dir, TRAJECTORIES, tmp_path, mode="sft", **kw)


def test_logged_lr_is_the_rate_each_update_used(tiny_dir, tmp_path):
    """train/lr of step k is the rate of update k (linear decay over 2 steps: 1e-3, then 5e-4), not the next one."""
    train.main(cfg(tiny_dir, TRAJECTORIES, tmp_path / "lr", mode="sft", max_steps=2, lr=1e-3, schedule="linear"))
    rows = [json.loads(l) for l in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    assert [r["train/lr"] for r in rows] == pytest.approx([1e-3, 5e-4])
