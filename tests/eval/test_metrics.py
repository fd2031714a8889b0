"""Per-reply outcomes, tables that sum to n, the official checker, verdicts and the recompute script (no model)."""
import asyncio
import copy
import json
import subprocess
import sys

from opsd_critic import make_critic
from opsd.critique.outcomes import reply_outcomes
from opsd.eval import metrics, targets
from opsd.eval.metrics import first_name, name_row
from opsd.eval.official import official_verdict
from opsd.eval.run import gt_call
from opsd.io.tasks import bfcl
from opsd.types import Critique, Trajectory
from tests.conftest import ROOT

TASKS = bfcl.load("multiple", "heldout")[:40]


def _reply(task, content, finish="stop", suffix=""):
    """A trajectory as `opsd rollout` writes it (raw generated text, parse error, finish reason)."""
    from opsd.rollout.run import parse_calls

    calls, err = parse_calls(content)
    msg = {"role": "assistant", "content": content, "token_ids": [0]}
    if calls:
        msg["tool_calls"] = calls
    meta = {"task_id": task.id, "sample": 0, "finish_reason": finish, "parse_error": err, "ground_truth":
            task.ground_truth, **task.meta}
    return Trajectory(f"{task.id}#s0{suffix}", task.messages + [msg], task.tools, meta)


def _call(name, args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def _correct(task):
    c = gt_call(task.ground_truth)[0]["function"]
    return _call(c["name"], json.loads(c["arguments"]))


def _critique(trajs):
    critic = make_critic("schema+reference")
    return [asyncio.run(critic.critique(t)) for t in trajs]


def _compare(before, after, tasks=TASKS, **kw):
    per_task = metrics.per_task_outcomes(tasks, before, after, _critique(before), _critique(after), reply_outcomes)
    return per_task, metrics.compare(per_task, n_boot=500, **kw)


def test_first_name_reads_truncated_looping_and_reordered_calls():
    assert first_name('<tool_call>\n{"name": "get_weather", "arguments": {"city": "x"}}\n</tool_call>') == (
        "get_weather", True)
    assert first_name('<tool_call>\n{"name": "calc.calc.calc.calc') == ("calc.calc.calc.calc", False)
    assert first_name('<tool_call>\n{"arguments": {"name": "John"}, "name": "f"}</tool_call>') == ("f", True)
    assert first_name('<tool_call>\n{"type": "function", "function": {"name": "g"}}</tool_call>') == ("g", True)
    assert first_name('<tool_call>\n{"name": "f" "arguments": {}}</tool_call>') == ("f", True)  # broken JSON after it
    assert first_name('<tool_call>\n{"arguments": {"a": 1}}</tool_call><tool_call>{"name": "h"}') == ("h", True)
    assert first_name('<tool_call>\n{"list": [{"name": "inner"}], "name": "outer"}</tool_call>') == ("outer", True)
    assert first_name('<tool_call>\n{"name": 5}</tool_call>') == (None, False)
    assert first_name("Sure, I can help with that.") == (None, False)


def test_name_row_counts_a_runaway_name_as_undeclared_and_a_cut_prefix_as_no_name():
    declared, gt = {"math.sqrt", "math.pow"}, {"math.sqrt"}
    assert name_row("math.sqrt", True, declared, gt) == "gt_function"
    assert name_row("math.pow", True, declared, gt) == "other_declared"
    assert name_row("math.pow", True, declared, None) == "declared_no_ground_truth"
    assert name_row("math.sqr", True, declared, gt) == "undeclared"
    assert name_row("math.sqrt.sqrt.sqrt", False, declared, gt) == "undeclared"  # looping, never closed
    assert name_row("math.sq", False, declared, gt) == "no_name"  # cut off inside a declared name
    assert name_row(None, False, declared, gt) == "no_name"


def test_a_model_that_hides_its_wrong_names_in_broken_calls_does_not_lower_the_undeclared_rate():
    """Before: clean calls to invented names. After: the same invented names, but the calls loop, never
    close, put the name after the arguments or break the JSON right after the name (the old report
    classed such replies `unparsable_call`, so its "hallucinated name" rate fell). The name metric does
    not move, and the target is not met."""
    before, after = [], []
    for k, task in enumerate(TASKS):
        wrong = task.tools[0]["function"]["name"] + "_v2"
        before.append(_reply(task, _call(wrong, {"x": 1})))
        hidden = [f'<tool_call>\n{{"name": "{wrong}' + "_v2" * 30,  # looping, never closed
                  f'<tool_call>\n{{"arguments": {{"x": 1}}, "name": "{wrong}"}}\n</tool_call>',  # name not first
                  f'<tool_call>\n{{"name": "{wrong}" "arguments": {{"x": 1}}}}\n</tool_call>',  # broken after it
                  f'<tool_call>\n{{"name": "{wrong}", "arguments": {{"x": 1, "y": [1, 2'][k % 4]  # cut off
        after.append(_reply(task, hidden, finish="length" if k % 4 in (0, 3) else "stop"))
    per_task, cmp = _compare(before, after)
    o = cmp["outcomes"]["names_undeclared_tool"]
    assert o["before"]["count"] == o["after"]["count"] == len(TASKS)
    assert o["diff"] == 0 and o["direction"] == "no significant change"
    assert cmp["outcomes"]["no_parseable_call"]["after"]["count"] == 3 * len(TASKS) // 4  # 3 of 4 forms are broken
    v = {x["key"]: x["verdict"] for x in targets.verdicts({"comparison": cmp, "collateral": {}})}
    assert v["no_declared_tool_falls"] == "not met" and v["no_collapse"] == "not met"


PLACEHOLDER = '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'


def test_a_model_that_stops_naming_tools_meets_no_target_and_the_verdicts_show_the_collapse():
    """Issue 24: "names an undeclared tool" went 86% -> 0% (the old target: MET) while "names no tool" went
    0% -> 79%: replies became a copy of the prompt's placeholder, or prose. Every target that counts errors
    counts those replies against the model, and a verdict line names the collapse."""
    from opsd.eval.report import verdict_lines

    before, after = [], []
    for k, t in enumerate(TASKS):
        declared = t.tools[0]["function"]["name"]
        before.append(_reply(t, _call(declared if k < 6 else declared + "_v2", {})))  # 34/40 undeclared
        after.append(_reply(t, _call(declared, {}) if k < 8 else PLACEHOLDER if k % 2 else "I can't help with that."))
    per_task, cmp = _compare(before, after)
    out = cmp["outcomes"]
    assert (out["names_undeclared_tool"]["before"]["count"], out["names_undeclared_tool"]["after"]["count"]) == (34, 0)
    assert out["names_no_tool"]["after"]["count"] == 32 and out["names_no_tool"]["direction"] == "up"
    assert (out["names_no_declared_tool"]["before"]["count"], out["names_no_declared_tool"]["after"]["count"]) == (34, 32)
    rep = {"comparison": cmp, "collateral": {}}
    rep["verdicts"] = targets.verdicts(rep)
    v = {x["key"]: x for x in rep["verdicts"]}
    assert v["no_declared_tool_falls"]["verdict"] == "not met"
    assert "undeclared 34, no name 0" in v["no_declared_tool_falls"]["evidence"]
    assert v["no_collapse"]["verdict"] == "not met" and "COLLAPSE: names no tool and no parseable call" in \
        v["no_collapse"]["evidence"]
    text = "\n".join(verdict_lines(rep))
    assert "**NOT MET**: no collapse" in text and "0/40 (0.0%) -> 32/40 (80.0%)" in text and "**MET**" not in text


def test_a_real_fix_of_invented_names_meets_the_name_targets():
    before = [_reply(t, _call(t.tools[0]["function"]["name"] + "_v2", {})) for t in TASKS]
    after = [_reply(t, _correct(t)) for t in TASKS]
    _, cmp = _compare(before, after)
    v = {x["key"]: x["verdict"] for x in targets.verdicts({"comparison": cmp, "collateral": {}})}
    assert v["no_declared_tool_falls"] == "met" and v["no_collapse"] == "met"


def test_every_reply_lands_in_one_row_of_each_table_with_failed_and_missing_critiques():
    tasks = TASKS[:12]
    before = [_reply(t, _correct(t) if k % 3 == 0 else _call("nope", {})) for k, t in enumerate(tasks)]
    after = [_reply(t, _correct(t)) for t in tasks[:-1]]  # the last task's rollout failed
    crit_b = _critique(before)
    crit_b[1] = Critique(crit_b[1].trajectory_id, "failed", error="critic raised")
    crit_b = crit_b[:-1]  # ... and one reply was never critiqued
    per_task = metrics.per_task_outcomes(tasks, before, after, crit_b, _critique(after), reply_outcomes)
    cmp = metrics.compare(per_task, n_boot=200)
    for table, t in cmp["tables"].items():
        for side in ("before", "after"):
            assert sum(o[side]["count"] for o in t["rows"].values()) == len(tasks), (table, side)
    critic = cmp["tables"]["critic"]["rows"]
    assert critic["critique_failed"]["before"]["count"] == 2
    assert critic["no_reply"]["after"]["count"] == 1 and cmp["tables"]["name"]["rows"]["no_reply"]["after"]["count"] == 1
    assert cmp["outcomes"]["critique_failed"]["before"]["count"] == 2
    assert per_task[-1]["after"]["rows"] == {t: "no_reply" for t in metrics.TABLES}


def test_official_checker_next_to_the_reference_critic():
    tasks = TASKS[:20]
    trajs = []
    for k, t in enumerate(tasks):
        good = json.loads(gt_call(t.ground_truth)[0]["function"]["arguments"])
        name = gt_call(t.ground_truth)[0]["function"]["name"]
        bad = copy.deepcopy(good)
        bad[next(iter(bad))] = "definitely wrong"
        trajs.append(_reply(t, _call(name, good if k % 2 == 0 else bad)))
    verdicts = [official_verdict(t)["verdict"] for t in trajs]
    assert verdicts == ["valid" if k % 2 == 0 else "invalid" for k in range(20)]
    per_task, cmp = _compare(trajs, trajs, tasks=tasks)
    rows = cmp["tables"]["agreement"]["rows"]
    assert rows["both_valid"]["before"]["count"] == 10 and rows["both_invalid"]["before"]["count"] == 10
    assert cmp["outcomes"]["official_accuracy"]["before"]["count"] == 10
    from opsd.eval.report import agreement_line

    assert "before 20/20 (100.0%)" in agreement_line(cmp)
    # a reply that is not a BFCL task is not scored by the official checker, and says so
    other = Trajectory("x", trajs[0].messages, trajs[0].tools, {**trajs[0].meta, "source": "file"})
    assert official_verdict(other)["verdict"] == "n/a"
    broken = _reply(tasks[0], '<tool_call>\n{"name": "x", "arguments": {')
    assert official_verdict(broken) == {"verdict": "invalid", "error": "a <tool_call> block was never closed"}


def test_the_rendered_ground_truth_call_is_what_the_official_checker_accepts():
    """The clean trajectory of the collateral metrics (the ground-truth call as the reply) is a correct reply:
    nested acceptable values are resolved (a dict parameter is not sent as a dict of lists)."""
    from opsd.eval.official import official_valid

    n = bad = 0
    for c in ("simple_python", "multiple", "parallel_multiple", "live_multiple"):
        for t in bfcl.load(c)[::3]:
            calls = [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in gt_call(t.ground_truth)]
            n += 1
            bad += not official_valid(c, t.id, calls, t.ground_truth)
    assert n > 500 and bad / n < 0.01, (bad, n)


def test_every_error_is_listed_not_only_the_first():
    t = TASKS[0]
    name = t.tools[0]["function"]["name"]
    two = _call(name + "_x", {}) + "\n" + _call(name, {"not_a_param": 1})
    out = reply_outcomes(_reply(t, two))
    cats = {e["category"] for e in out["errors"]}
    assert {"unknown_tool", "unknown_parameter"} <= cats
    assert out["reference"] == "error"


def test_a_reply_without_any_call_is_never_error_free():
    """Without ground truth, a prose reply used to have no error at all ("replies with an error" fell when a
    model stopped calling tools); it is a `no_call` error now; with ground truth it is `missing_call`."""
    t = TASKS[0]
    prose = _reply(t, "I cannot help with that.")
    no_gt = Trajectory(prose.id, prose.messages, prose.tools, {k: v for k, v in prose.meta.items() if k != "ground_truth"})
    assert [e["category"] for e in reply_outcomes(no_gt)["errors"]] == ["no_call"]
    assert {e["category"] for e in reply_outcomes(prose)["errors"]} == {"missing_call"}
    assert metrics.reply_outcome(no_gt, None, reply_outcomes)["rows"]["n_errors"] == "1"
    called = _reply(t, _call(t.tools[0]["function"]["name"], {}))
    called = Trajectory(called.id, called.messages, called.tools, no_gt.meta)
    assert "no_call" not in {e["category"] for e in reply_outcomes(called)["errors"]}


def _report(per_task, cmp):
    rep = {"version": 2, "config": {"bootstrap": 500, "seed": 0, "before": "a", "after": "b", "tasks": "t",
                                    "limit": None}, "comparison": cmp, "per_task": per_task, "collateral": {}}
    rep["verdicts"] = targets.verdicts(rep)
    return rep


def test_recompute_script_reproduces_every_number_and_catches_a_tampered_one(tmp_path):
    before = [_reply(t, _call(t.tools[0]["function"]["name"] + "_v2", {})) for t in TASKS]
    after = [_reply(t, _correct(t) if k % 2 else _call("nope", {})) for k, t in enumerate(TASKS)]
    per_task, cmp = _compare(before, after)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_report(per_task, cmp)))
    script = [sys.executable, str(ROOT / "scripts" / "recompute_report.py"), str(path)]
    r = subprocess.run(script, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 mismatches" in r.stdout
    # a stored rate that does not follow from the per-task outcomes is caught
    rep = json.loads(path.read_text())
    rep["comparison"]["outcomes"]["names_undeclared_tool"]["after"]["count"] -= 1
    path.write_text(json.dumps(rep))
    r = subprocess.run(script, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "outcomes.names_undeclared_tool.after.count" in r.stdout
    # so is a per-task fact that was edited after the report was written
    rep = _report(per_task, cmp)
    rep["per_task"][0]["after"]["name"] = rep["per_task"][0]["tool_names"][0]
    path.write_text(json.dumps(rep))
    r = subprocess.run(script, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "MISMATCH outcomes.names_declared_tool" in r.stdout


def _binary(b, a, n, **kw):
    from opsd.eval import stats

    return stats.paired_binary([True] * b + [False] * (n - b), [True] * a + [False] * (n - a), **kw)


def test_verdicts_follow_the_targets():
    # 40 -> 10 of 128: -75% relative, p tiny: met
    assert targets.no_declared_tool_falls(_binary(40, 10, 128))[0] == "met"
    # 10 -> 4 of 30: -60% but p = 0.031: not significant
    assert targets.no_declared_tool_falls(_binary(10, 4, 30))[0] == "not significant"
    # 60 -> 40 of 128: significant but only -33%: not met
    assert targets.no_declared_tool_falls(_binary(60, 40, 128))[0] == "not met"
    assert targets.no_declared_tool_falls(_binary(0, 0, 128))[0] == "not testable"
    # 7 -> 0: even the best case has McNemar p = 2/128 >= 0.01: it cannot be met, so it is not testable
    assert targets.no_declared_tool_falls(_binary(7, 0, 128))[0] == "not testable"
    assert targets.no_declared_tool_falls(_binary(8, 0, 128))[0] == "met"
    rise, flat = _binary(20, 60, 128), _binary(20, 22, 128)
    assert targets.no_collapse(rise, flat)[0] == "not met" and targets.no_collapse(flat, rise)[0] == "not met"
    assert targets.no_collapse(flat, flat)[0] == "met" and targets.no_collapse(rise, flat)[1].count("COLLAPSE") == 1
    assert targets.no_collapse(_binary(125, 125, 128), _binary(128, 128, 128))[0] == "not testable"
    assert targets.official_accuracy_holds(_binary(0, 0, 128))[0] == "not testable"  # cannot fall: never "met"
    assert targets.official_accuracy_holds(_binary(20, 5, 128))[0] == "not met"
    assert targets.official_accuracy_holds(_binary(20, 18, 128))[0] == "met"
    ok, ev = targets.official_accuracy_holds(_binary(6, 20, 128))
    assert ok == "met" and "a rise" in ev and "(significant)" in ev
    kl = {"n": 10, "n_tokens": 300, "kl_per_token": {"mean": 0.01, "ci95": [0.005, 0.02]}}
    assert targets.gt_call_kl(kl)[0] == "met"
    assert targets.gt_call_kl(kl | {"kl_per_token": {"mean": 0.04, "ci95": [0.02, 0.07]}})[0] == "not significant"
    assert targets.gt_call_kl(kl | {"kl_per_token": {"mean": 0.08, "ci95": [0.06, 0.1]}})[0] == "not met"
    assert targets.gt_call_kl({"n": 0})[0] == "not testable"


def test_accuracy_that_cannot_fall_significantly_is_not_testable():
    """McNemar needs 6 discordant pairs for p < 0.05 (2 * 0.5^5 = 0.0625): with 5 correct base replies even
    losing all 5 is "no significant fall", so "does not fall" could never fail and is not reported as met."""
    from opsd.eval import stats

    assert targets.official_accuracy_holds(_binary(5, 0, 128))[0] == "not testable"
    ok, ev = targets.official_accuracy_holds(_binary(5, 20, 128))
    assert ok == "not testable" and "a rise" in ev and "p = 0.062" in ev
    assert targets.official_accuracy_holds(_binary(6, 0, 128))[0] == "not met"
    assert targets.official_accuracy_holds(_binary(6, 6, 128))[0] == "met"
    first = next(k for k in range(1, 20) if stats.mcnemar_exact(k, 0) < targets.ALPHA)
    assert first == 6 and targets.reachable(first, targets.ALPHA) and not targets.reachable(first - 1, targets.ALPHA)


def test_per_category_rates():
    tasks = bfcl.load("simple_python", "heldout")[:10] + TASKS[:10]
    before = [_reply(t, _call("nope", {})) for t in tasks]
    after = [_reply(t, _correct(t) if t.meta["category"] == "multiple" else _call("nope", {})) for t in tasks]
    _, cmp = _compare(before, after, tasks=tasks)
    pc = cmp["per_category"]
    assert set(pc) == {"simple_python", "multiple"} and pc["multiple"]["n"] == 10
    assert pc["multiple"]["n_tools_mean"] > 1 and pc["simple_python"]["n_tools_mean"] == 1
    assert pc["multiple"]["outcomes"]["official_accuracy"]["after"]["count"] == 10
    assert pc["simple_python"]["outcomes"]["official_accuracy"]["after"]["count"] == 0
    assert pc["multiple"]["outcomes"]["names_undeclared_tool"]["direction"] == "down"


def test_compare_reports_pairs_the_same_side_of_two_reports(tmp_path):
    """scripts/compare_reports.py: report A's after-model vs report B's after-model, task by task."""
    wrong = [_reply(t, _call(t.tools[0]["function"]["name"] + "_v2", {})) for t in TASKS]
    right = [_reply(t, _correct(t)) for t in TASKS]
    half = [_reply(t, _correct(t) if k % 2 else _call("nope", {})) for k, t in enumerate(TASKS)]
    a = _report(*_compare(wrong, right))  # A: after = every call right
    b = _report(*_compare(wrong, half))  # B: after = half right, half undeclared
    b["per_task"] = b["per_task"][::-1][:-1]  # order does not matter; a task only A scored is left out
    for name, rep in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rep))
    out = tmp_path / "cmp.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_reports.py"), str(tmp_path / "a.json"),
                        str(tmp_path / "b.json"), "--names", "fp32", "bf16", "--bootstrap", "200", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    n = len(TASKS) - 1
    und = res["after"]["outcomes"]["names_undeclared_tool"]
    assert res["after"]["n"] == n and und["before"]["count"] == 0
    assert und["after"]["count"] == sum(k % 2 == 0 for k in range(1, len(TASKS))) and und["p"] < 0.05  # task 0 left out
    assert res["before"]["outcomes"]["names_undeclared_tool"]["diff"] == 0  # the same base replies on both sides
    assert "| names an undeclared tool (diagnostic: naming none also lowers it) | 0.0% (0) |" in r.stdout and "bf16 − fp32" in r.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_reports.py"), str(tmp_path / "a.json"),
                          str(tmp_path / "missing.json")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "missing.json: cannot read" in bad.stderr
    # a round's model: its rollouts file next to the report, or the report's after-model when that round was kept
    a["config"]["after"], b["config"]["after"] = "runs/x/round_1/train/model", "runs/y/round_2/train/model"
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "b.json").write_text(json.dumps(b))
    with (tmp_path / "b" / "rollouts_round_1.jsonl").open("w") as f:  # B's round 1 replies: its after-model's
        f.writelines(json.dumps(t.to_dict()) + "\n" for t in half[1:])
    with (tmp_path / "b" / "critiques_round_1.jsonl").open("w") as f:
        f.writelines(json.dumps(c.to_dict()) + "\n" for c in _critique(half[1:]))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_reports.py"), str(tmp_path / "a.json"),
                        str(tmp_path / "b" / "b.json"), "--side", "round_1", "--bootstrap", "200", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["round_1"]["outcomes"]["names_undeclared_tool"] == und
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_reports.py"), str(tmp_path / "a.json"),
                        str(tmp_path / "b" / "b.json"), "--side", "round_3"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "rollouts_round_3.jsonl" in r.stderr
