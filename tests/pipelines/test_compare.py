"""`opsd compare`: each method's data from the same rollouts, the config checks, and a tiny-model run end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opsd.pipelines.compare import METHODS, CompareConfig, method_data, passes
from opsd.pipelines.compare_report import any_error, method_row
from opsd.types import Critique, Trajectory
from tests.conftest import ROOT

GT = [{"get_weather": {"city": ["Paris"], "unit": ["", "celsius"]}}]


def traj(task: str, k: int, *, parse_error: str | None = None) -> Trajectory:
    msgs = [{"role": "user", "content": "weather in Paris?"}, {"role": "assistant", "content": f"reply {k}"}]
    return Trajectory(f"{task}#s{k}", msgs, [], {"task_id": task, "ground_truth": GT, "parse_error": parse_error})


def crit(t: Trajectory, verdict: str) -> Critique:
    return Critique(t.id, verdict, step=1 if verdict == "error" else None, quote="x" if verdict == "error" else None,
                    hint="h" if verdict == "error" else None, category="unknown_tool" if verdict == "error" else None)


def test_method_data_comes_from_the_same_rollouts(tmp_path):
    trajs = [traj("a", 0), traj("a", 1), traj("a", 2, parse_error="cut off"), traj("b", 0), traj("b", 1)]
    crits = [crit(trajs[0], "ok"), crit(trajs[1], "error"), crit(trajs[2], "ok"), crit(trajs[3], "error"),
             crit(trajs[4], "failed")]
    assert [passes(t, c) for t, c in zip(trajs, crits)] == [True, False, False, False, False]
    data = method_data(trajs, crits, tmp_path)
    assert set(data) == set(METHODS)
    assert data["opsd"]["critiques"] == data["dense"]["critiques"] == str(tmp_path / "critiques.jsonl")
    assert (data["opsd"]["span"], data["dense"]["span"]) == ("quote", "step") and data["opsd"]["examples"] == 2
    read = lambda m: [json.loads(x) for x in open(data[m]["trajectories"])]
    reward = read("reward")  # the failed critique has no verdict: not a reward of 0
    assert [(r["id"], r["meta"]["reward"]) for r in reward] == [("a#s0", 1.0), ("a#s1", 0.0), ("a#s2", 0.0), ("b#s0", 0.0)]
    assert data["reward"]["examples"] == 3 and data["reward"]["replies"] == 4  # task b: all 0, no signal
    assert [r["id"] for r in read("rft")] == ["a#s0"] and data["rft"]["examples"] == 1
    gt = read("sft-gt")  # one ground-truth reply per task: the first acceptable value, optional params left out
    assert [g["id"] for g in gt] == ["a#gt", "b#gt"]
    call = gt[0]["messages"][-1]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert gt[0]["messages"][:-1] == trajs[0].messages[:-1]


def test_config_checks():
    with pytest.raises(ValueError, match="methods: grpo; choose from opsd, dense"):
        CompareConfig(methods="opsd,grpo")
    with pytest.raises(ValueError, match="reward needs >= 4"):
        CompareConfig(samples=2)
    CompareConfig(samples=2, methods="opsd,rft")  # fine without reward
    with pytest.raises(ValueError, match="lrs: comma-separated numbers"):
        CompareConfig(lrs="fast")
    from opsd.train.config import TrainConfig

    with pytest.raises(ValueError, match="train.lr: set by compare"):
        CompareConfig(train=TrainConfig(lr=1e-3))


def test_any_error_counts_missing_replies_and_method_rows_are_paired():
    o = lambda n: {"rows": {"n_errors": n, "official": "invalid", "name": "undeclared", "critic": "x", "finish": "stop"},
                   "errors": [{"category": "unknown_tool"}] if n not in ("0", "no_reply") else [], "reply": "r"}
    assert [any_error(o(n)) for n in ("0", "1", "3+", "no_reply", "not_checked")] == [False, True, True, True, False]
    per_task = [{"before": o("1"), "after": o("0")}] * 6 + [{"before": o("1"), "after": o("1")}] * 2
    row = method_row(per_task, None, {}, bootstrap=200)
    e = row["vs_base"]["any_error"]
    assert (e["before"]["rate"], e["after"]["rate"], e["only_before"]) == (1.0, 0.25, 6) and e["p"] < 0.05
    assert row["errors_vs_base"]["unknown_tool"]["diff"] == -0.75 and "vs_opsd" not in row


@pytest.mark.slow
def test_compare_on_a_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "opsd.cli", "compare", "--out", str(out), "--limit", "2", "--samples", "4",
            "--steps", "1", "--lrs", "1e-3", "--validation-limit", "2", "--heldout-limit", "3", "--max-new-tokens", "6",
            "--prefill", "<tool_call>\\n", "--bootstrap", "100", "--train.model", str(tiny_model_dir),
            "--train.precision", "fp32", "--train.batch-size", "2", "--train.min-hint-effect=-inf"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "compare.json").read_text())
    assert res["shared"]["rollouts"] == 8 and [m["method"] for m in res["methods"]] == list(METHODS)
    rows = res["heldout"]["rows"]
    for m in ("opsd", "dense", "sft-gt"):  # a random model's replies always have errors: these have data
        assert rows[m]["status"] == "trained" and rows[m]["n"] == 3, m
        assert rows[m]["gt_call"]["n"] >= 1 and rows[m]["vs_base"]["official_accuracy"]["n"] == 3
    assert "vs_opsd" in rows["dense"] and "vs_opsd" not in rows["opsd"]
    for m in ("reward", "rft"):  # no reply passed: nothing to learn from, reported as such
        assert rows[m]["status"] == "no training data", rows[m]
    md = (out / "compare.md").read_text()
    assert "| sft-gt (reference: sees the answers) |" in md and "## Against opsd" in md
    files = {p: p.read_text() for p in sorted(out.rglob("*.jsonl")) if "train" not in p.parts}
    r2 = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)  # resumes: nothing rolled out again
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert {p: p.read_text() for p in files} == files
