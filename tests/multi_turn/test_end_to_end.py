"""Multi-turn rollout -> critique -> train -> eval on held-out BFCL multi-turn tasks, with the real embedded model.

A few tasks only (the ones with the shortest prompts of each split), short replies and few steps per turn:
this checks that the machinery works on long trajectories, not what the 135M model scores.
"""
from __future__ import annotations

import json

import pytest

from opsd.io.tasks import bfcl_multi_turn as mt
from opsd.io.tasks import load_tasks

N_TRAIN, N_EVAL, MAX_NEW, STEPS = 1, 1, 40, 2  # one episode each: 158 s with two (make test budget)


def _smallest(split: str, n: int, tok, path) -> str:
    """A task file of the n tasks of `split` with the shortest prompts (same tasks every run)."""
    from opsd.render import prompt_ids

    tasks = sorted(load_tasks(f"bfcl:multi_turn_base:{split}"),
                   key=lambda t: (len(prompt_ids(t.messages, t.tools, tok)), t.id))[:n]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": t.id, "messages": t.messages, "tools": t.tools, "meta": t.meta}) + "\n" for t in tasks)
    return str(path)


@pytest.mark.slow
def test_rollout_critique_train_eval_on_held_out_multi_turn_tasks(tmp_path, smol_tokenizer):
    from opsd.critique.config import CriticConfig
    from opsd.critique.run import critique_fn
    from opsd.eval.config import EvalConfig
    from opsd.eval.multi_turn import main as eval_main
    from opsd.rollout.run import RolloutConfig, load_rollouts
    from opsd.rollout.run import main as rollout_main
    from opsd.train.config import TrainConfig
    from opsd.train.run import main as train_main

    train_file = _smallest("train", N_TRAIN, smol_tokenizer, tmp_path / "train_tasks.jsonl")
    eval_file = _smallest("heldout", N_EVAL, smol_tokenizer, tmp_path / "heldout_tasks.jsonl")
    with open(eval_file, encoding="utf-8") as f:
        assert all(mt.split_of(json.loads(x)["id"]) == "heldout" for x in f)

    rcfg = RolloutConfig(tasks=train_file, out=str(tmp_path / "rollouts.jsonl"), max_new_tokens=MAX_NEW,
                         max_steps_per_turn=STEPS, device="cpu")
    assert rollout_main(rcfg)["errors"] == 0
    trajs = load_rollouts(rcfg)
    assert len(trajs) == N_TRAIN and all(t.meta["multi_turn"]["steps"] >= t.meta["multi_turn"]["turns_played"] for t in trajs)

    critique = critique_fn(CriticConfig(name="schema+reference"), progress=False, echo=lambda s: None)
    crits = critique(trajs, tmp_path / "critiques.jsonl")
    errors = [c for c in crits if c.verdict == "error"]
    assert errors, [c.error for c in crits]  # the 135M model gets something wrong in every episode
    for c in errors:
        traj = next(t for t in trajs if t.id == c.trajectory_id)
        assert traj.messages[c.step]["role"] == "assistant"

    run = tmp_path / "train"
    train_main(TrainConfig(trajectories=rcfg.out, critiques=str(tmp_path / "critiques.jsonl"), out=str(run),
                           max_steps=2, lr=5e-5, batch_size=1, gradient_checkpointing=True,  # ~4k-token examples
                           min_hint_effect=float("-inf"), progress=False))
    assert (run / "model").is_dir()

    ecfg = EvalConfig(before="smollm2-135m-instruct", after=str(run / "model"), tasks=eval_file, limit=None,
                      out=str(tmp_path / "report"), max_new_tokens=MAX_NEW, device="cpu", bootstrap=200)
    report = eval_main(ecfg, critique, max_steps_per_turn=STEPS, log=lambda s: None)
    assert report["n_paired"] == N_EVAL and report["accuracy"]["n"] == N_EVAL
    pos = report["first_error_position"]["before"]
    n_err = sum(p["before"]["critic"] == "error" for p in report["per_task"])
    assert pos["n"] == n_err and sum(pos["step"].values()) == n_err
    for p in report["per_task"]:
        fe = p["before"]["first_error"]
        if fe:
            assert 1 <= fe["step"] <= fe["of"] == p["before"]["steps"] and 1 <= fe["turn"] <= fe["turns"]
    tf = report["teacher_forced"]
    if tf["n_examples"]:
        assert tf["error_span_logprob"]["delta"] != 0  # the trained model scores the base model's errors differently
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Multi-turn evaluation")
