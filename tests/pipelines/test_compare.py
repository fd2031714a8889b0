"""`opsd compare`: each method's data from the same rollouts, the config checks, and a tiny-model run end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opsd.pipelines.compare import METHODS, CompareConfig, method_data, passes
from opsd.pipelines.compare_report import any_error, format_compare, method_row
from opsd.pipelines.validation import Validation, summarise_validation
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


def test_any_error_counts_missing_replies_and_crashed_checks_and_method_rows_are_paired():
    o = lambda n: {"rows": {"n_errors": n, "official": "invalid", "name": "undeclared", "critic": "x", "finish": "stop"},
                   "errors": [{"category": "unknown_tool"}] if n not in ("0", "no_reply") else [], "reply": "r"}
    assert [any_error(o(n)) for n in ("0", "1", "3+", "no_reply", "not_checked")] == [False, True, True, True, True]
    per_task = [{"before": o("1"), "after": o("0")}] * 6 + [{"before": o("1"), "after": o("1")}] * 2
    row = method_row(per_task, None, {}, bootstrap=200)
    e = row["vs_base"]["any_error"]
    assert (e["before"]["rate"], e["after"]["rate"], e["only_before"]) == (1.0, 0.25, 6) and e["p"] < 0.05
    assert row["errors_vs_base"]["unknown_tool"]["diff"] == -0.75 and "vs_opsd" not in row


def _bfcl_reply(task, content: str) -> Trajectory:
    from opsd.rollout.run import parse_calls

    calls, err = parse_calls(content)
    msg = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
    return Trajectory(f"{task.id}#s0", task.messages + [msg], task.tools,
                      {"task_id": task.id, "finish_reason": "stop", "parse_error": err,
                       "ground_truth": task.ground_truth, **task.meta})


def _gt_name(task) -> str:
    return next(iter(task.ground_truth[0]))


def _val_tasks(n: int):
    from opsd.io.tasks import bfcl

    return bfcl.load("multiple", "validation")[:n]


def test_a_check_that_crashed_counts_as_an_error_and_has_its_own_row(monkeypatch):
    """Issue 22 item 5: a reply whose outcome check raised used to count as error-free in validation and compare."""
    from opsd.eval.metrics import per_task_outcomes
    from opsd.pipelines import validation

    tasks = _val_tasks(6)
    clean = [_bfcl_reply(t, '<tool_call>\n{"name": "%s", "arguments": {}}\n</tool_call>' % _gt_name(t)) for t in tasks]
    crits = [Critique(t.id, "ok") for t in clean]

    def crash(traj):
        raise RuntimeError("checker bug")

    monkeypatch.setattr(validation, "reply_outcomes", crash)
    v = summarise_validation(clean, crits)
    assert (v.error_rate, v.not_checked) == (1.0, 1.0)
    per_task = per_task_outcomes(tasks, clean, clean, crits, crits, lambda t: {"errors": [], "reference": "ok"})
    for t in per_task[:4]:  # 4 of 6 after-replies: the check crashed
        t["after"] = per_task_outcomes(tasks[:1], clean[:1], clean[:1], crits, crits, crash)[0]["after"]
    row = method_row(per_task, None, {}, bootstrap=100)
    assert row["vs_base"]["not_checked"]["after"]["count"] == 4 and row["vs_base"]["any_error"]["after"]["count"] == 4
    assert row["vs_base"]["any_error"]["before"]["count"] == 0


def test_the_pick_never_prefers_a_model_whose_calls_stopped_parsing():
    """Issue 22 item 2: compare picked lr 1e-4 on right function 0.844 against 0.719 (accuracy 0 and errors
    100% at both); its held-out calls were 100% unparseable. Read from real replies: the model that names the
    right function in broken calls loses to the one whose calls parse."""
    tasks = _val_tasks(8)
    crit = lambda ts: [Critique(t.id, "error", category="x") for t in ts]
    broken = [_bfcl_reply(t, '<tool_call>\n{"name": "%s", "arguments": {"x": ' % _gt_name(t)) for t in tasks]
    parsing = [_bfcl_reply(t, '<tool_call>\n{"name": "%s", "arguments": {}}\n</tool_call>'
                           % (_gt_name(t) if k < 4 else t.tools[-1]["function"]["name"] + "_v2"))
               for k, t in enumerate(tasks)]
    vb, vp = summarise_validation(broken, crit(broken)), summarise_validation(parsing, crit(parsing))
    assert vb.gt_function == 1.0 > vp.gt_function == 0.5 and vb.accuracy == vp.accuracy
    assert vb.error_rate == vp.error_rate == 1.0 and (vb.parseable, vp.parseable) == (0.0, 1.0)
    assert vp.better_than(vb) and vb.worse_than(vp) and not vb.better_than(vp)
    # the keys in order: accuracy, then right function in a parseable call, then parseable, then errors
    v = lambda acc, gtp, ok, err, gt=0.0: Validation(10, acc, err, 0.0, (0, 1), (0, 1), gt, ok, gtp)
    assert v(0.2, 0.0, 0.1, 1.0).better_than(v(0.1, 0.9, 1.0, 0.0))
    assert v(0.0, 0.3, 0.3, 1.0).better_than(v(0.0, 0.1, 1.0, 0.0, gt=0.9))
    assert v(0.0, 0.1, 0.5, 1.0).better_than(v(0.0, 0.1, 0.4, 0.0))
    assert v(0.0, 0.1, 0.5, 0.4).better_than(v(0.0, 0.1, 0.5, 0.5)) and not v(0, 0, 0, 0.5).better_than(v(0, 0, 0, 0.5))


def test_the_compare_table_counts_replies_without_a_name_against_the_method():
    """Issue 22 item 1: `opsd` "met" the undeclared-name drop while 100% of its replies had no parseable call.
    The table's name column is "does not name a declared tool": prose does not lower it."""
    tasks = _val_tasks(10)
    from opsd.critique.outcomes import reply_outcomes
    from opsd.eval.metrics import per_task_outcomes

    before = [_bfcl_reply(t, '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>') for t in tasks]
    after = [_bfcl_reply(t, "Sorry, I cannot call a tool.") for t in tasks]
    crits = lambda ts: [Critique(t.id, "error", category="x") for t in ts]
    per_task = per_task_outcomes(tasks, before, after, crits(before), crits(after), reply_outcomes)
    row = method_row(per_task, None, {}, bootstrap=100)
    o = row["vs_base"]["names_no_declared_tool"]
    assert (o["before"]["count"], o["after"]["count"]) == (10, 10) and "names_undeclared_tool" not in row["vs_base"]
    assert row["vs_base"]["any_error"]["after"]["count"] == 10 and row["vs_base"]["no_parseable_call"]["after"]["count"] == 10


def test_compare_examples_are_the_examples_kept_after_the_hint_filter(tmp_path, monkeypatch):
    """Issue 22 item 9: the table's "examples" for opsd and dense is what training kept (data.json "kept"),
    not the number of critiqued errors."""
    from opsd.pipelines import compare

    trajs = [traj("a", k) for k in range(4)]
    crits = [crit(t, "error") for t in trajs]
    data = compare.method_data(trajs, crits, tmp_path)
    assert data["opsd"]["critiqued_errors"] == 4

    def fake_trained(tcfg, marker):
        train = tmp_path / "opsd" / "lr_0.001" / "train"
        train.mkdir(parents=True, exist_ok=True)
        (train / "data.json").write_text(json.dumps({"built": 3, "kept": 2}))
        return "model"

    monkeypatch.setattr(compare, "trained", fake_trained)
    monkeypatch.setattr(compare, "rollouts", lambda *a, **k: [])
    monkeypatch.setattr(compare, "summarise_validation", lambda trajs, crits: Validation(1, 0, 1, 0, (0, 1), (0, 1)))
    cfg = CompareConfig(out=str(tmp_path), lrs="1e-3", methods="opsd")
    rec = compare.run_method(cfg, "opsd", data["opsd"], lambda t, p: [], "", Validation(1, 0, 1, 0, (0, 1), (0, 1)),
                             tmp_path, lambda s: None)
    assert rec["data"]["examples"] == 2 and rec["data"]["critiqued_errors"] == 4


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
