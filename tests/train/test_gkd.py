"""GKD mode on a tiny random Llama: records, data paths per lmbda, teacher == student, GKD+RL, fixes, vocab check."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from opsd.train import run as train
from opsd.train import sources as gkd
from opsd.train import step as train_step
from opsd.train.config import TrainConfig
from opsd.train.losses import token_logprobs
from opsd.train.records import TrainRecord
from opsd.train.scoring import span_logits, span_logprobs
from tests.conftest import CRITIQUES, TRAJECTORIES, save_tiny, tiny_llama


def gkd_cfg(model_dir, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), trajectories=str(TRAJECTORIES), out=str(out), max_steps=3, batch_size=2,
                lr=1e-3, progress=False, seed=3, max_new_tokens=6, precision="fp32")
    return TrainConfig(**{**base, **kw})


def step_rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]


def test_records_cover_the_last_reply(smol_tok, trajectories):
    recs, counts = gkd.build_records(trajectories, smol_tok, teacher_system="Think before you call a tool.")
    assert counts["used"] == len(recs) == len(trajectories)
    for r, t in zip(recs, trajectories):
        s0, s1 = r.student_span
        t0, t1 = r.teacher_span
        assert r.student_ids[s0:s1] == r.teacher_ids[t0:t1] and len(r.student_ids) == s1
        assert smol_tok.decode(r.student_ids[s1 - 1:s1]) == "<|im_end|>"  # the end-of-turn token is a target
        assert smol_tok.decode(r.student_ids[s0 - 3:s0]).endswith("assistant\n")  # the prompt ends at the header
        assert "Think before" in smol_tok.decode(r.teacher_ids[:t0]) and "Think before" not in smol_tok.decode(r.student_ids)
        msgs = r.prompt.messages
        assert msgs == t.messages[:len(msgs)] and t.messages[len(msgs)]["role"] == "assistant"
        assert TrainRecord.from_dict(r.to_dict()) == r  # examples.jsonl round-trips


def test_step_source_follows_lmbda_and_cold_start():
    kinds = lambda **kw: Counter(gkd.step_source(TrainConfig(**kw), s) for s in range(400))
    assert kinds(lmbda=0.0) == {"dataset": 400}
    assert kinds(lmbda=1.0) == {"student": 400}
    assert kinds(lmbda=0.0, seq_kd=True) == {"teacher": 400}
    half = kinds(lmbda=0.5, cold_start_sft=10)
    assert half["sft"] == 10 and 150 < half["student"] < 240 and half["student"] + half["dataset"] == 390
    assert kinds(critiques="c.jsonl", cold_start_sft=3) == {"sft": 3, "opsd": 397}  # OPSD mode


def test_advantages_and_selection():
    assert gkd.advantages([1, 0, 1, 1], [0, 0, 1, 1]) == [0.5, -0.5, 0.0, 0.0]
    keep, back = gkd.keep_with_mix([True, False, False, False, True], mix=0.5, seed=0)
    assert back == 2 and {0, 4} <= set(keep) and len(keep) == 4
    assert gkd.keep_with_mix([False] * 4, mix=0.0, seed=0) == ([], 0)


@pytest.mark.parametrize("teacher", ["self", "external"])
def test_teacher_equal_to_student_gives_zero_loss_and_unchanged_weights(tiny_dir, tmp_path, teacher):
    """No masking: the divergence's gradient is exactly 0 where the teacher equals the student (test_losses), so
    Adam never sees rounding noise; the same run with an instructed teacher does train."""
    kw = dict(teacher="external", teacher_model=str(tiny_dir)) if teacher == "external" else dict(teacher="self")
    out = tmp_path / "run"
    train.main(gkd_cfg(tiny_dir, out, lmbda=0.5, **kw))  # both data paths (seed 3: student, dataset, dataset)
    rows = step_rows(out)
    assert {r["source/on_policy"] for r in rows} == {0.0, 1.0}
    for r in rows:
        assert r["train/loss"] == 0.0 and r["diag/kl"] == 0.0 and r["diag/top16_overlap"] == 1.0
        assert r["diag/entropy_gap"] == 0.0 and r["train/grad_norm"] == 0.0
    before, after = load_file(tiny_dir / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    for k in before:
        assert torch.equal(before[k], after[k]), k
    out = tmp_path / "instructed"  # the contrast: a teacher that sees an instruction differs, and the run trains
    train.main(gkd_cfg(tiny_dir, out, lmbda=0.5, teacher_system="Answer in French.", **kw))
    rows = step_rows(out)
    assert all(r["train/loss"] > 0 and r["train/grad_norm"] > 0 for r in rows)
    after = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("lmbda,seq_kd,source", [(0.0, False, "dataset"), (1.0, False, "student"), (0.0, True, "teacher")])
def test_lmbda_takes_the_intended_data_path(tiny_dir, tmp_path, smol_tok, lmbda, seq_kd, source):
    ext = save_tiny(tmp_path / "teacher", smol_tok, seed=9)
    out = tmp_path / "run"
    train.main(gkd_cfg(tiny_dir, out, teacher="external", teacher_model=str(ext), lmbda=lmbda, seq_kd=seq_kd))
    rows = step_rows(out)
    assert [r[f"source/{source}"] for r in rows] == [1, 2, 3]
    assert all(not k.startswith("source/") or k in (f"source/{source}", "source/on_policy", "source/sampled_replies")
               for r in rows for k in r)
    assert [r["source/on_policy"] for r in rows] == [float(source == "student")] * 3
    sampled = [r.get("source/sampled_replies", 0) for r in rows]
    assert sampled == ([0] * 3 if source == "dataset" else [2] * 3)  # batch 2: one sample per prompt
    for r in rows:  # a different teacher: real divergence, every diagnostic in range
        assert r["train/loss"] > 0 and 0 <= r["diag/top16_overlap"] <= 1 and 0 <= r["diag/overlap_mass"] <= 1
        assert r["diag/kl"] > 0 and r["diag/entropy_gap"] >= 0 and r["diag/entropy_teacher"] > 0
    data = json.loads((out / "data.json").read_text())
    assert data["built"] == data["kept"] == 8


def test_gkd_rl_calls_the_injected_reward(tiny_dir, tmp_path, smol_tok):
    ext = save_tiny(tmp_path / "teacher", smol_tok, seed=9)
    seen = []

    def reward_fn(trajs):
        seen.append(trajs)
        return [float(i % 2) for i in range(len(trajs))]
    cfg = gkd_cfg(tiny_dir, tmp_path / "run", teacher="external", teacher_model=str(ext), lmbda=1.0, rl_alpha=0.5,
                  samples_per_prompt=2, max_steps=2)
    with pytest.raises(ValueError, match="reward function"):
        train.main(cfg)
    train.main(cfg, reward_fn=reward_fn)
    assert [len(b) for b in seen] == [4, 4]  # 2 prompts x 2 samples per step
    a, b = seen[0][0], seen[0][1]
    assert a.messages[:-1] == b.messages[:-1] and a.messages[-1]["role"] == "assistant"
    assert a.messages[-1]["token_ids"] and a.messages[-1]["content"] == smol_tok.decode(a.messages[-1]["token_ids"])
    rows = step_rows(tmp_path / "run")
    assert [r["rl/reward_mean"] for r in rows] == [0.5, 0.5] and rows[-1]["source/sampled_replies"] == 4


def test_reinforce_raises_the_rewarded_reply(smol_tok):
    """rl_alpha = 0: a small SGD step on (+0.5, −0.5) advantages raises reply A relative to reply B."""
    from dataclasses import replace

    lm = tiny_llama(len(smol_tok), seed=1).train()
    prompt, a, b = [1, 200, 300, 400], [500, 600, 700], [800, 900, 1000]
    base = TrainRecord("p", prompt, (4, 4), prompt, (4, 4))
    recs = [replace(base.with_reply(r), advantage=adv) for r, adv in ((a, 0.5), (b, -0.5))]
    mb = train_step.make_micro_batch(recs, pad_id=2)
    lp = lambda: [x.sum().item() for x in span_logprobs(lm, [r.student_ids for r in recs], [(4, 7)] * 2).token_logprobs]
    before = lp()
    s = mb.student
    logits_NV = span_logits(lm, s.input_ids, s.attention_mask, s.batch_idx, s.pos)
    objective = train_step.objective(mb, torch.zeros(6), token_logprobs(logits_NV, s.targets), rl_alpha=0.0)
    objective.backward()
    with torch.no_grad():
        for p in lm.parameters():
            p -= 1e-2 * p.grad
    after = lp()
    assert after[0] - after[1] > before[0] - before[1] + 0.01, (before, after)  # first order: +η/2·|∇A − ∇B|²


def test_cold_start_sft_runs_first(tiny_dir, tmp_path):
    out = tmp_path / "gkd"
    train.main(gkd_cfg(tiny_dir, out, cold_start_sft=2, max_steps=2, lmbda=0.0, teacher="external",
                       teacher_model=str(tiny_dir)))
    rows = step_rows(out)
    assert [r.get("source/sft") for r in rows] == [1, 2, 2, 2] and [r.get("source/dataset") for r in rows] == [None, None, 1, 2]
    assert all(r["train/sft_nll"] > 0 for r in rows[:2]) and "train/sft_nll" not in rows[2]
    out = tmp_path / "opsd"  # OPSD: SFT on the hinted teacher's own continuation from the error span
    train.main(gkd_cfg(tiny_dir, out, critiques=str(CRITIQUES), min_hint_effect=float("-inf"), cold_start_sft=1,
                       max_steps=1))
    rows = step_rows(out)
    assert rows[0]["source/sft"] == 1 and rows[0]["source/sampled_replies"] == 2 and rows[1]["source/opsd"] == 1


def test_select_prompts(tiny_dir, tmp_path, smol_tok):
    ext = str(save_tiny(tmp_path / "teacher", smol_tok, seed=9))
    out = tmp_path / "none_pass"
    train.main(gkd_cfg(tiny_dir, out, teacher="external", teacher_model=ext, select_prompts=True, select_overlap=1.01,
                       select_mix=0.5, max_steps=1))
    data = json.loads((out / "data.json").read_text())
    assert (data["selected"], data["mixed_back"], data["kept"]) == (0, 4, 4) and 0 <= data["overlap_mean"] <= 1
    recs = [json.loads(l) for l in (out / "examples.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["overlap"] < 1.01 for r in recs)
    out = tmp_path / "opsd"  # OPSD: the hint-effect threshold, with a fraction of the rejected mixed back
    train.main(gkd_cfg(tiny_dir, out, critiques=str(CRITIQUES), min_hint_effect=1e9, select_prompts=True,
                       select_mix=0.5, max_steps=1))
    data = json.loads((out / "data.json").read_text())
    assert (data["built"], data["filtered_hint_effect"], data["mixed_back"], data["kept"]) == (6, 3, 3, 3)


def test_gkd_vocab_mismatch_names_both_sizes(tiny_dir, tmp_path, smol_tok):
    ext = save_tiny(tmp_path / "small_vocab", smol_tok, vocab_size=1000)
    cfg = gkd_cfg(tiny_dir, tmp_path / "run", teacher="external", teacher_model=str(ext), lmbda=1.0)
    assert cfg.is_gkd
    with pytest.raises(ValueError, match=r"teacher vocab size 1000 != student vocab size 49152"):
        train.main(cfg)


def test_gkd_config_checks():
    for bad, msg in [({"lmbda": 1.5}, "lmbda"), ({"rl_alpha": 0.5}, "lmbda > 0"),
                     ({"rl_alpha": 0.5, "lmbda": 1.0, "samples_per_prompt": 1}, "samples_per_prompt"),
                     ({"teacher": "external", "teacher_model": "x", "precompute_targets": True}, "OPSD-only"),
                     ({"mode": "opsd", "trajectories": "t.jsonl"}, "critiques"), ({"mode": "kd"}, "mode")]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**bad)
    assert TrainConfig().is_gkd and not TrainConfig(critiques="c.jsonl").is_gkd and TrainConfig(mode="gkd", critiques="c").is_gkd


def test_critic_reward_for_the_cli(trajectories):
    """`opsd train --rl-alpha` reward (built in opsd.critique.run): 1 for a valid call, 0 for an error or no call."""
    from opsd_critic import make_critic
    from opsd.critique.run import critic_reward
    from opsd.types import Trajectory

    cut = {t.id: Trajectory(t.id, t.messages[:i + 1], t.tools, t.meta) for t in trajectories
           for i in [next((i for i, m in enumerate(t.messages) if m.get("tool_calls")), None)] if i is not None}
    rewards = dict(zip(cut, critic_reward(make_critic("schema"))(list(cut.values()))))
    assert rewards["weather-ok"] == 1.0 and rewards["weather-unknown-tool"] == 0.0 and rewards["flights-missing-arg"] == 0.0
    plain = trajectories[0]  # its last message is plain text: no call, no reward
    assert critic_reward(make_critic("schema"))([plain]) == [0.0]
