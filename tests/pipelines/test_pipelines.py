"""`opsd loop` and `opsd demo`: rounds, fresh tasks, early stopping on validation, resume (tiny model for plumbing)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opsd.pipelines import loop
from opsd.pipelines.loop import LoopConfig, Validation, round_tasks
from tests.conftest import ROOT

TINY = ["--rollout.prefill", "<tool_call>\\n", "--rollout.temperature", "1.0", "--rollout.limit", "3", "--rollout.max-new-tokens", "6",
        "--rollout.precision", "fp32", "--train.min-hint-effect=-inf",
        "--validation-limit", "3"]


def opsd(*args):
    return subprocess.run([sys.executable, "-m", "opsd.cli", *args], capture_output=True, text=True, cwd=ROOT)


def v(acc: float, err: float, gt: float = 0.0) -> Validation:
    return Validation(10, acc, err, 0.0, (0.0, 1.0), (0.0, 1.0), gt, 1.0, gt)  # every reply parses


def test_validation_order_is_accuracy_then_ground_truth_function_then_errors():
    assert v(0.2, 0.9).better_than(v(0.1, 0.1, 0.9)) and v(0.1, 0.1).worse_than(v(0.2, 0.9))
    assert v(0.0, 1.0, 0.3).better_than(v(0.0, 0.5, 0.1)) and v(0.0, 0.5, 0.1).worse_than(v(0.0, 1.0, 0.3))
    assert v(0.0, 0.4).better_than(v(0.0, 0.5)) and not v(0.0, 0.5).better_than(v(0.0, 0.5))
    assert not v(0.0, 0.5).worse_than(v(0.0, 0.5))


def test_round_tasks_are_fresh_every_round_and_deterministic():
    spec = "bfcl:multiple:train"
    r0, r1 = (round_tasks(spec, k, 5, seed=0, fresh=True) for k in (0, 1))
    assert len(r0) == len(r1) == 5 and not {t.id for t in r0} & {t.id for t in r1}
    assert [t.id for t in round_tasks(spec, 1, 5, seed=0, fresh=True)] == [t.id for t in r1]
    assert [t.id for t in round_tasks(spec, 1, 5, seed=0, fresh=False)] == [t.id for t in r0]
    assert [t.id for t in round_tasks(spec, 0, 5, seed=1, fresh=True)] != [t.id for t in r0]


def test_fields_the_loop_sets_are_rejected():
    for bad in (["--rollout.out", "x.jsonl"], ["--train.out", "somewhere"], ["--train.critiques", "c.jsonl"]):
        r = opsd("loop", "--out", "/tmp/never", *bad)
        assert r.returncode == 2 and "set by the loop" in r.stderr, r.stderr


def test_early_stop_keeps_the_best_round(monkeypatch, tmp_path):
    """The decision logic alone: stages replaced by stand-ins; validation goes up, then down."""
    scores = iter([v(0.10, 0.8), v(0.20, 0.7), v(0.15, 0.6), v(0.9, 0.0)])
    trained = iter(["m1", "m2", "m3"])
    monkeypatch.setattr(loop, "validate", lambda *a, **k: next(scores))
    monkeypatch.setattr(loop, "rollout_main", lambda cfg: {})
    monkeypatch.setattr(loop, "load_rollouts", lambda cfg: [])
    monkeypatch.setattr(loop, "train_main", lambda cfg: next(trained))
    monkeypatch.setattr(loop, "_hint_summary", lambda out: {})
    err = type("C", (), {"verdict": "error", "category": "unknown_tool"})()
    monkeypatch.setattr(loop, "critique_fn", lambda cfg, **k: (lambda trajs, path: [err]))
    hist = loop.main(LoopConfig(out=str(tmp_path), rounds=3, rollout=loop._loop_rollout(), ceiling=False),
                     echo=lambda s: None)
    assert [r["round"] for r in hist["rounds"]] == [1, 2] and hist["stopped_early"]
    assert hist["best_round"] == 1 and hist["best_model"] == "m1"
    assert hist["rounds"][1]["student"] == "m1"  # round 2 starts from round 1's student
    assert json.loads((tmp_path / "loop.json").read_text())["best_model"] == "m1"


@pytest.mark.slow
def test_loop_two_rounds_on_a_tiny_model_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "loop"
    args = ["loop", "--rounds", "2", "--no-early-stop", "--train.model", str(tiny_model_dir), *TINY, "--out", str(out)]
    r = opsd(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    hist = json.loads((out / "loop.json").read_text())
    assert [h["round"] for h in hist["rounds"]] == [1, 2]
    assert hist["rounds"][1]["student"] == hist["rounds"][0]["trained_model"] == str(out / "round_1" / "train" / "model")
    ids = [{json.loads(x)["id"] for x in (out / f"round_{k}" / "tasks.jsonl").read_text().splitlines()} for k in (1, 2)]
    assert len(ids[0]) == len(ids[1]) == 3 and not ids[0] & ids[1]
    assert "validation" in hist["rounds"][1] and hist["base_validation"]["n"] == 3
    assert "| base |" in (out / "loop.md").read_text()
    files = {k: sorted((out / f"round_{k}").glob("*.jsonl")) for k in (1, 2)}
    before = {p: p.read_text() for ps in files.values() for p in ps}
    r2 = opsd(*args)  # resumes: nothing is rolled out twice
    assert r2.returncode == 0, r2.stderr[-3000:]
    after = {p: p.read_text() for k in (1, 2) for p in sorted((out / f"round_{k}").glob("*.jsonl"))}
    assert after == before and len(before) == 6  # tasks, rollouts, critiques per round; nothing rolled out twice


@pytest.mark.slow
def test_demo_on_a_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    r = opsd("demo", "--rounds", "1", "--every-round", "--cold-start-steps", "0", "--train.model", str(tiny_model_dir), *TINY, "--eval.limit", "4",
             "--eval.max-new-tokens", "6", "--eval.precision", "fp32", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["comparison"]["n"] == 4 and len(rep["per_task"]) == 4
    assert rep["config"]["before"] == str(tiny_model_dir)
    assert "Verdicts (n=4 held-out tasks" in r.stdout and "| base |" in r.stdout
    rows = json.loads((out / "report" / "rounds.json").read_text())
    assert [x["round"] for x in rows] == [1] and rows[0]["n"] == 4


# ---------------------------------------------------------------- training and validation stay off the held-out tasks

def test_a_spec_without_a_split_is_refused_with_the_overlap_named():
    """`bfcl:multiple,parallel_multiple` loads `all`, held-out included: the loop would train on what the demo scores."""
    from opsd.rollout.config import RolloutConfig

    with pytest.raises(ValueError, match=r"rollout\.tasks: \d+ of the 400 tasks of 'bfcl:multiple,parallel_multiple' "
                                         r"ask a question of the held-out tasks .*multiple_1 = multiple_1"):
        LoopConfig(rollout=RolloutConfig(tasks="bfcl:multiple,parallel_multiple", out="", limit=8))
    with pytest.raises(ValueError, match=r"validation_tasks: .*'bfcl:multiple:heldout'"):
        LoopConfig(validation_tasks="bfcl:multiple:heldout")
    LoopConfig()  # the defaults (train and validation splits) pass
    LoopConfig(tasks="bfcl:multi_turn_base")  # each stage takes its own split


def test_the_demo_refuses_training_on_the_tasks_it_scores():
    r = opsd("demo", "--out", "/tmp/never", "--rollout.tasks", "bfcl:multiple,parallel_multiple")
    assert r.returncode == 2 and "ask a question of the held-out tasks" in r.stderr, r.stderr[-2000:]


def test_overlap_is_by_question_text_not_by_task_id(tmp_path):
    """BFCL repeats questions across categories under other ids: simple_python_4 asks what held-out multiple_96
    asks, so `bfcl:simple_python` (all) overlaps `bfcl:multiple:heldout` although no id is shared; a task file
    with a held-out question under an id of its own overlaps too."""
    from opsd.io.tasks import load_tasks
    from opsd.pipelines.compare import CompareConfig
    from opsd.pipelines.demo import DemoConfig

    with pytest.raises(ValueError, match=r"simple_python_4 = multiple_96"):
        CompareConfig(tasks="bfcl:simple_python", heldout_tasks="bfcl:multiple:heldout")
    held = load_tasks("bfcl:multiple:heldout", limit=1)[0]
    user = held.messages[-1]["content"]
    f = tmp_path / "tasks.jsonl"
    f.write_text(json.dumps({"id": "mine-1", "messages": [{"role": "user", "content": "  " + user.upper() + "!"}],
                             "tools": held.tools}) + "\n")
    with pytest.raises(ValueError, match=rf"tasks: 1 of the 1 tasks of '{f}' .*mine-1 = {held.id}"):
        CompareConfig(tasks=str(f))
    with pytest.raises(ValueError, match=r"validation_tasks: .*mine-1"):
        DemoConfig(validation_tasks=str(f))
    CompareConfig()  # the defaults pass
