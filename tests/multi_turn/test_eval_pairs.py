"""Multi-turn evaluation pairs every task: an episode whose rollout failed is a failure, never dropped
(issue 22 item 6), in `opsd eval`'s multi-turn report and in the demo's per-round rows. No model."""
from __future__ import annotations

import dataclasses

from opsd.eval import multi_turn
from opsd.eval.config import EvalConfig
from opsd.io.tasks import load_tasks
from opsd.pipelines import demo
from opsd.types import Critique
from tests.multi_turn.conftest import gt_script, play_script, script

SPEC = "bfcl:multi_turn_base:heldout"


def _episodes(n: int):
    tasks = load_tasks(SPEC, limit=n)
    good = [play_script(t, script(gt_script(t))) for t in tasks]
    good = [dataclasses.replace(g, meta={**g.meta, "task_id": t.id}) for g, t in zip(good, tasks)]  # as a rollout writes it
    return tasks, good, [Critique(g.id, "ok") for g in good]


def test_a_failed_episode_is_a_failure_in_every_outcome():
    tasks, good, ok = _episodes(3)
    assert all(multi_turn.episode_outcome(g, c)["valid"] for g, c in zip(good, ok))
    per_task = multi_turn.paired_episodes([t.id for t in tasks], good, ok, good[:2], ok[:1])  # after: 1 crashed
    assert [p["task_id"] for p in per_task] == [t.id for t in tasks]
    assert per_task[2]["after"] == multi_turn.no_episode_outcome()
    cmp = multi_turn.compare_episodes(per_task, n_boot=100)
    assert cmp["accuracy"]["n"] == 3 and (cmp["accuracy"]["before"]["count"], cmp["accuracy"]["after"]["count"]) == (3, 2)
    # episode 2: no critique (counted as an error); episode 3: no episode at all
    assert cmp["critic_error"]["after"]["count"] == 2 and cmp["episode_failed"]["after"]["count"] == 1
    assert cmp["steps"]["n"] == 2  # replies per episode: only where both episodes exist, and it says so
    md = multi_turn.markdown({"config": {"tasks": SPEC}, "n_paired": 3, **cmp, "first_error_position":
                              {"before": {"n": 0}, "after": {"n": 0}}, "finish_reasons": {}, "official_error_types": {}})
    assert "episode failed (no result)" in md and "(2/3)" in md


def test_demo_round_rows_pair_every_held_out_task(monkeypatch, tmp_path):
    """The old rows paired only the tasks both models finished: a round whose episodes crashed looked no worse."""
    tasks, good, ok = _episodes(3)
    rollouts = {"before": good, "round_1": good[:1]}  # round 1: two of three episodes failed
    monkeypatch.setattr(multi_turn, "_rollouts", lambda model, name, *a: rollouts[name])
    ecfg = dataclasses.replace(EvalConfig(), tasks=SPEC, limit=3, before="base", after="best", out=str(tmp_path),
                               bootstrap=100)
    history = {"rounds": [{"round": 1, "trained_model": "m1"}]}
    critique = lambda trajs, path: [Critique(t.id, "ok") for t in trajs]
    rows = demo.multi_turn_round_rows(ecfg, history, critique, "", 2)
    acc = rows[0]["outcomes"]["official_accuracy"]
    assert rows[0]["n"] == 3 and (acc["before"]["count"], acc["after"]["count"]) == (3, 1)
    assert rows[0]["outcomes"]["critic_error"]["after"]["count"] == 2
