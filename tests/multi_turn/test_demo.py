"""`opsd demo` / `opsd loop` on BFCL multi-turn tasks: validation and the held-out evaluation use the same
categories' multi-turn splits, episodes scored by BFCL's official multi-turn checker."""
from __future__ import annotations

import dataclasses
import json

import pytest

from opsd.io.tasks import bfcl_multi_turn as mt
from opsd.pipelines import loop
from opsd.pipelines.demo import DEMO_TASKS, HELDOUT_SPEC, DemoConfig
from opsd.pipelines.loop import VALIDATION_SPEC, LoopConfig, multi_turn_split, summarise_validation
from opsd.types import Critique
from tests.multi_turn.conftest import call_text, gt_script, play_script, script, task

MT_TRAIN = "bfcl:multi_turn_base:train"


def _rollout(tasks: str):
    return dataclasses.replace(loop._loop_rollout(), tasks=tasks)


def test_multi_turn_rounds_validate_and_evaluate_on_the_multi_turn_splits():
    cfg = DemoConfig(rollout=_rollout(MT_TRAIN))
    assert cfg.validation_tasks == "bfcl:multi_turn_base:validation"
    assert cfg.eval.tasks == "bfcl:multi_turn_base:heldout"
    assert LoopConfig(rollout=_rollout("bfcl:multi_turn_base,multi_turn_miss_func:train")).validation_tasks == \
        "bfcl:multi_turn_base,multi_turn_miss_func:validation"
    # single-turn rounds keep the single-turn splits; flags the user set are kept
    single = DemoConfig()
    assert (single.rollout.tasks, single.validation_tasks, single.eval.tasks) == (
        f"{DEMO_TASKS}:train", f"{DEMO_TASKS}:validation", f"{DEMO_TASKS}:heldout")
    assert single.rollout.max_new_tokens == single.eval.max_new_tokens == 128
    assert single.train.anchor == 0.3 and LoopConfig().train.anchor == 0  # the demo anchors its rounds (RESULTS §0d)
    loop_mix = DemoConfig(tasks="")  # --tasks '': the loop's default categories and splits
    assert (loop_mix.validation_tasks, loop_mix.eval.tasks) == (VALIDATION_SPEC, HELDOUT_SPEC)
    own = DemoConfig(rollout=_rollout("bfcl:parallel:train"))  # the user's own rollout.tasks replaces the default mix
    assert (own.tasks, own.rollout.tasks, own.validation_tasks, own.eval.tasks) == (
        "", "bfcl:parallel:train", VALIDATION_SPEC, HELDOUT_SPEC)
    mine = DemoConfig(rollout=_rollout(MT_TRAIN), validation_tasks="", eval=dataclasses.replace(
        DemoConfig().eval, tasks="bfcl:multi_turn_miss_param:heldout"))
    assert (mine.validation_tasks, mine.eval.tasks) == ("", "bfcl:multi_turn_miss_param:heldout")
    assert multi_turn_split("bfcl:multiple,multi_turn_base:train", "heldout") is None  # mixed: not switched
    assert multi_turn_split("tasks.jsonl", "heldout") is None


def test_tasks_flag_gives_every_stage_its_split_of_the_same_categories():
    for spec in ("bfcl:multi_turn_base", "bfcl:multi_turn_base:train"):
        cfg = DemoConfig(tasks=spec)
        assert (cfg.rollout.tasks, cfg.validation_tasks, cfg.eval.tasks) == (
            "bfcl:multi_turn_base:train", "bfcl:multi_turn_base:validation", "bfcl:multi_turn_base:heldout")
    cfg = DemoConfig(tasks="bfcl:simple,multiple")
    assert (cfg.rollout.tasks, cfg.validation_tasks, cfg.eval.tasks) == (
        "bfcl:simple,multiple:train", "bfcl:simple,multiple:validation", "bfcl:simple,multiple:heldout")
    assert dataclasses.replace(cfg, rounds=1).rollout.tasks == "bfcl:simple,multiple:train"  # rebuilt: same
    for bad, match in (("bfcl:multi_turn_base:heldout", "^tasks: BFCL categories"), ("tasks.jsonl", "^tasks: "),
                       ("bfcl:", "^tasks: ")):
        with pytest.raises(ValueError, match=match):
            DemoConfig(tasks=bad)
    with pytest.raises(ValueError, match="^tasks, rollout.tasks: give one of them"):
        LoopConfig(tasks="bfcl:multi_turn_base", rollout=_rollout("bfcl:simple:train"))


def test_multi_turn_validation_reads_episodes_with_the_official_checker():
    t = task("multi_turn_base_0")
    good = play_script(t, script(gt_script(t)))
    bad_turns = gt_script(t)
    bad_turns[0][0] = call_text("rm_everything", {})  # an undeclared tool, first
    bad = play_script(t, script(bad_turns))
    bad = dataclasses.replace(bad, id=bad.id + "-bad")
    assert mt.official_check(good.messages, good.meta)["valid"] and not mt.official_check(bad.messages, bad.meta)["valid"]
    crits = [Critique(trajectory_id=good.id, verdict="ok"),
             Critique(trajectory_id=bad.id, verdict="error", step=2, category="unknown_tool")]
    v = summarise_validation([good, bad], crits[::-1])  # matched by id, not by order
    assert (v.n, v.accuracy, v.error_rate, v.undeclared_name, v.gt_function) == (2, 0.5, 0.5, 0.5, 0.5)


@pytest.mark.slow
def test_demo_on_multi_turn_tasks_evaluates_held_out_episodes_with_the_official_checker(tmp_path, capsys,
                                                                                        tiny_model_dir):
    """Plumbing, so the tiny random model (the embedded one took 112 s here): one task per split, a few tokens per
    reply, one reply per user turn."""
    from opsd.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--rounds", "1", "--tasks", "bfcl:multi_turn_base", "--rollout.limit", "1",
               "--train.model", str(tiny_model_dir), "--rollout.prefill", "<tool_call>\\n",
               "--rollout.max-new-tokens", "12", "--rollout.max-steps-per-turn", "1", "--validation-limit", "1",
               "--train.batch-size", "1", "--train.max-steps", "1", "--train.gradient-checkpointing",
               "--train.min-hint-effect=-inf", "--train.no-progress", "--eval.limit", "1", "--eval.max-new-tokens", "12",
               "--eval.bootstrap", "100", "--out", str(out)])
    assert rc == 0
    hist = json.loads((out / "loop.json").read_text())
    assert hist["config"]["validation_tasks"] == "bfcl:multi_turn_base:validation"
    val = [json.loads(x) for x in (out / "base_validation" / "rollouts.jsonl").read_text().splitlines()]
    assert len(val) == 1 and mt.split_of(val[0]["meta"]["task_id"]) == "validation" and mt.is_multi_turn(val[0]["meta"])
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["config"]["tasks"] == "bfcl:multi_turn_base:heldout" and rep["n_paired"] == 1  # the multi-turn report
    before = rep["per_task"][0]["before"]
    assert mt.split_of(rep["per_task"][0]["task_id"]) == "heldout" and isinstance(before["valid"], bool)
    assert 1 <= before["steps"] <= before["turns"]  # one reply per user turn at most
    rows = json.loads((out / "report" / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [1] and rows[0]["n"] == 1 and set(rows[0]["outcomes"]) == {
        "official_accuracy", "critic_error"}
    printed = capsys.readouterr().out
    assert "# Multi-turn evaluation (bfcl:multi_turn_base:heldout, n=1)" in printed and "critic finds an error" in printed
