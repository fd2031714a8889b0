"""The loop's cold start (SFT on ground-truth calls before round 1) and the hinted teacher's ceiling."""
from __future__ import annotations

import json

import pytest

from opsd.eval.run import gt_call
from opsd.hint.ceiling import hinted_tasks, measure_ceiling, teacher_verified
from opsd.io.tasks import load_tasks
from opsd.pipelines.cold_start import gt_trajectories
from opsd.pipelines.loop import LoopConfig
from opsd.rollout.run import parse_calls
from opsd.types import Critique, Trajectory
from tests.conftest import ROOT
from tests.pipelines.test_pipelines import TINY, opsd

FIXTURE = ROOT / "tests" / "fixtures" / "bfcl_rollouts.jsonl"


def test_gt_trajectories_reply_with_the_ground_truth_call():
    tasks = load_tasks("bfcl:multiple:train", limit=5)
    trajs = gt_trajectories(tasks)
    assert len(trajs) == 5 and all(t.messages[:-1] == task.messages for t, task in zip(trajs, tasks))
    assert all(t.messages[-1]["tool_calls"] == gt_call(task.ground_truth) for t, task in zip(trajs, tasks))
    assert gt_trajectories([tasks[0].__class__("x", tasks[0].messages, tasks[0].tools, None)]) == []


def _reply(traj: Trajectory, text: str) -> Trajectory:
    calls, err = parse_calls(text)
    msg = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
    return Trajectory(traj.id + "-h", traj.messages[:-1] + [msg], traj.tools, {**traj.meta, "parse_error": err})


def test_ceiling_pairs_the_hinted_teacher_with_the_student_and_counts_every_reply():
    trajs = [Trajectory.from_dict(json.loads(line)) for line in FIXTURE.open()][:3]
    crits = [Critique(t.id, "error", step=1, quote="x", hint="Use the listed tool.", category=cat)
             for t, cat in zip(trajs, ("unknown_tool", "unknown_tool", "wrong_value"))]
    tasks = hinted_tasks(trajs, crits)
    assert [t["id"] for t in tasks] == [t.meta["task_id"] for t in trajs]
    assert tasks[0]["messages"][-1]["role"] == "user" and "Use the listed tool." in tasks[0]["messages"][-1]["content"]
    assert tasks[0]["messages"][:-1] == trajs[0].messages[:1]  # the prompt above the erroneous step
    gt0 = gt_call(trajs[0].meta["ground_truth"])[0]["function"]
    good = _reply(trajs[0], '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>' % (gt0["name"], gt0["arguments"]))
    prose = _reply(trajs[1], "I cannot help with that.")
    hinted = [good, prose]  # the third task's hinted reply is missing (a rollout failure): not fixed
    h_crits = [Critique(good.id, "ok"), Critique(prose.id, "error", step=1, quote="I", hint="h", category="unparsable_call")]
    rep = measure_ceiling(trajs, crits, hinted, h_crits, n_boot=200)
    assert rep["n_tasks"] == rep["n_hinted"] == 3
    assert rep["accuracy_hinted"]["after"]["count"] == 1 and rep["accuracy_hinted"]["before"]["count"] == 0
    assert rep["critic_ok_hinted"]["count"] == 1  # prose and the missing reply count against the teacher
    assert rep["by_category"]["unknown_tool"]["n"] == 2 and rep["by_category"]["wrong_value"]["accurate"]["count"] == 0
    assert [(r["trajectory_id"], r["accurate"], r["fixes"]) for r in rep["per_reply"]] == [
        (trajs[0].id, True, True), (trajs[1].id, False, False), (trajs[2].id, False, False)]  # prose does not fix
    ok_crits = [Critique(t.id, "ok") for t in trajs]  # no error: the teacher is the student, nothing decoded
    rep = measure_ceiling(trajs, ok_crits, [], [], n_boot=200)
    assert rep["n_hinted"] == 0 and rep["accuracy_all"]["after"] == rep["accuracy_all"]["before"]


def test_train_on_keeps_the_replies_whose_hinted_teacher_acted_on_the_hint(tmp_path):
    rows = [{"trajectory_id": "a", "accurate": True, "fixes": True}, {"trajectory_id": "b", "accurate": False,
            "fixes": True}, {"trajectory_id": "c", "accurate": False, "fixes": False}]
    crits = [Critique(x, "error", step=1, quote="q", hint="h", category="wrong_value") for x in "abcd"]
    crits.append(Critique("e", "ok"))
    path = tmp_path / "critiques-x.jsonl"
    kept, out = teacher_verified({"per_reply": rows}, crits, "fixes", path)
    assert [c.trajectory_id for c in kept] == ["a", "b", "e"] and out == tmp_path / "critiques-x-fixes.jsonl"
    assert [json.loads(x)["trajectory_id"] for x in out.read_text().splitlines()] == ["a", "b", "e"]
    kept, out = teacher_verified({"per_reply": rows}, crits, "correct", path)
    assert [c.trajectory_id for c in kept] == ["a", "e"] and out.name == "critiques-x-correct.jsonl"
    with pytest.raises(ValueError, match="train_on"):
        teacher_verified({"per_reply": rows}, crits, "best", path)
    with pytest.raises(ValueError, match="train_on"):
        LoopConfig(train_on="fixes", ceiling=False)


@pytest.mark.slow
def test_loop_with_cold_start_and_ceiling_on_a_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "loop"
    args = ["loop", "--rounds", "1", "--no-early-stop", "--train.model", str(tiny_model_dir), *TINY, "--out", str(out),
            "--cold-start-steps", "2", "--cold-start-tasks", "bfcl:multiple:train"]
    r = opsd(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    hist = json.loads((out / "loop.json").read_text())
    cs = hist["cold_start"]
    assert cs["round"] == 0 and cs["cold_start"]["steps"] == 2 and cs["validation"]["n"] == 3
    assert hist["rounds"][0]["student"] == cs["trained_model"] == str(out / "cold_start" / "train" / "model")
    metrics = [json.loads(x) for x in (out / "cold_start" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train/sft_nll" in m or "train/loss" in m][-1] == 2
    ceiling = json.loads((out / "round_1" / "ceiling" / "ceiling.json").read_text())
    errors = hist["rounds"][0]["errors"]
    assert ceiling["n_tasks"] == 3 and ceiling["n_hinted"] == errors
    assert len((out / "round_1" / "ceiling" / "rollouts.jsonl").read_text().splitlines()) == errors
    assert "| cold start |" in (out / "loop.md").read_text()
    # the same loop training only on replies its hinted teacher got right: a random model gets none, so no round trains
    r = opsd(*args, "--train-on", "correct")
    assert r.returncode == 0, r.stderr[-3000:]
    kept = (out / "round_1").glob("critiques-*-correct.jsonl")
    assert [json.loads(x)["verdict"] for f in kept for x in f.read_text().splitlines()].count("error") == 0
    assert "no errors left to learn from" in r.stdout and "trained_model" not in json.loads((out / "loop.json").read_text())["rounds"][0]


@pytest.mark.slow
def test_demo_with_cold_start_pairs_each_round_with_the_cold_start(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    r = opsd("demo", "--rounds", "1", "--no-early-stop", "--every-round", "--train.model", str(tiny_model_dir), *TINY,
             "--eval.limit", "4", "--eval.max-new-tokens", "6", "--eval.precision", "fp32", "--out", str(out),
             "--cold-start-steps", "1", "--cold-start-tasks", "bfcl:multiple:train", "--no-ceiling")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "report" / "rounds.json").read_text())
    assert [x["round"] for x in rows] == [0, 1] and "vs_cold_start" not in rows[0]
    vs = rows[1]["vs_cold_start"]["official_accuracy"]
    assert vs["before"] == rows[0]["outcomes"]["official_accuracy"]["after"]  # before = the cold start's replies
    assert vs["after"] == rows[1]["outcomes"]["official_accuracy"]["after"]
    assert "against the cold-started model" in (out / "report" / "rounds.md").read_text()
    wall = json.loads((out / "wall.json").read_text())
    assert {"loop_cold_start", "loop_train", "heldout_eval", "total"} <= set(wall)
    stages = ("rollouts_before", "rollouts_after", "critiques", "teacher_forced")  # the held-out eval, per stage
    rep = json.loads((out / "report" / "report.json").read_text())
    assert list(rep["wall_s"]) == list(stages) and all(wall[f"heldout_{k}"] == rep["wall_s"][k] >= 0 for k in stages)
    assert sum(rep["wall_s"].values()) <= wall["heldout_eval"]
