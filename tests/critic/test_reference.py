"""Reference critic: BFCL possible-answer semantics, agreement with the official AST checker,
and localisation of each reference error class."""
from __future__ import annotations

import json
import random
import subprocess
from collections import Counter

import pytest

from opsd_critic.matching import standardize, value_ok
from opsd_critic.reference import ReferenceCritic
from opsd_critic.validate import check_critique, lint_hint
from opsd.io.tasks import bfcl
from opsd.io.trajectories import load_trajectories
from opsd.render import message_text
from opsd.types import Trajectory
from tests.conftest import ROOT
from tests.critic.bfcl_official import official_valid
from tests.critic.perturb import KINDS, gt_calls, perturb, to_trajectory

FIXTURE = ROOT / "tests" / "fixtures" / "bfcl_rollouts.jsonl"
CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple")
PER_CATEGORY = 100


def _verdict(traj) -> str:
    return check_critique(ReferenceCritic().check(traj), traj).verdict


def test_possible_answer_semantics():
    assert standardize("San Francisco, CA") == standardize("san-francisco ca") == "sanfranciscoca"
    assert standardize("it's") == 'it"s'
    num = {"type": "number"}
    assert value_ok(5, [5.0], num) and not value_ok(5.5, [5.0], num)
    assert not value_ok(5.0, [5], {"type": "integer"})  # a float is not an integer
    assert not value_ok(True, [1], {"type": "integer"})  # nor is a bool
    assert value_ok("NEW YORK", ["New York"], {"type": "string"})
    assert value_ok(["a b", "C"], [["ab", "c"]], {"type": "array", "items": {"type": "string"}})
    assert value_ok({"k": "V"}, [{"k": ["v"], "opt": [""]}], {"type": "object"})
    assert not value_ok({"k": "v"}, [{"k": ["v"], "req": ["x"]}], {"type": "object"})


def _agreement(trajs_and_official):
    n = agree = 0
    disagreements = []
    for traj, official in trajs_and_official:
        mine = _verdict(traj)
        n += 1
        if (mine == "ok") == official and mine != "failed":
            agree += 1
        else:
            disagreements.append((traj.id, official, mine))
    return n, agree, disagreements


def test_agrees_with_official_checker_on_perturbed_outputs():
    """400 outputs (100 per category) from ground truth with 13 seeded perturbation kinds."""
    cases, kinds = [], Counter()
    for cat in CATEGORIES:
        for i, task in enumerate(bfcl.load(cat)[:PER_CATEGORY]):
            rng = random.Random(f"{cat}:{task.id}")
            kind = KINDS[i % len(KINDS)]
            calls = perturb(task, kind, rng)
            kinds[official_valid(cat, task.id, calls, task.ground_truth)] += 1
            cases.append((to_trajectory(task, calls, raw=i % 2 == 0, tid=task.id),
                          official_valid(cat, task.id, calls, task.ground_truth)))
    n, agree, bad = _agreement(cases)
    print(f"\nreference vs official BFCL checker (perturbed): {agree}/{n} = {agree / n:.1%}; "
          f"official valid {kinds[True]}, invalid {kinds[False]}")
    assert kinds[True] >= 100 and kinds[False] >= 100  # both verdicts well represented
    assert agree / n >= 0.99, bad[:10]


def _fixture_committed() -> bool:
    r = subprocess.run(["git", "ls-files", "--error-unmatch", str(FIXTURE.relative_to(ROOT))], cwd=ROOT,
                       capture_output=True)
    return r.returncode == 0


PREFILL = "<tool_call>\n"  # the fixture's rollouts were generated with this reply prefill


def _reply(prefix: list[dict], calls: list[tuple[str, dict]], tid: str, t) -> Trajectory:
    text = "\n".join(PREFILL + json.dumps({"name": n, "arguments": a}) + "\n</tool_call>" for n, a in calls)
    step = {"role": "assistant", "content": text, "token_ids": [0], "prefill": PREFILL}
    return Trajectory(tid, prefix + [step], t.tools, t.meta)


def test_agrees_with_official_checker_on_real_rollouts():
    """Real SmolLM2-135M BFCL rollouts (tests/fixtures/bfcl_rollouts.jsonl), plus one correct reply
    per task (its ground-truth calls, rendered as the model would write them): verdict agreement.

    The official checker rates every real rollout invalid, so the correct replies are what make
    this test fail for a critic that always says "error". The official checker sees the calls
    the rollout parsed (`tool_calls`); the critic reads the raw text. Skips only while the
    fixture is neither present nor committed.
    """
    if not FIXTURE.exists():
        if _fixture_committed():
            pytest.fail(f"{FIXTURE} is committed but missing from the working tree")
        pytest.skip("real-rollout fixture not generated yet (tests/fixtures/bfcl_rollouts.jsonl)")
    trajs = load_trajectories(FIXTURE)
    assert len(trajs) >= 100, f"fixture has only {len(trajs)} rollouts"
    cases = []
    for t in trajs:
        k = next(i for i, m in enumerate(t.messages) if m["role"] == "assistant")
        step = t.messages[k]
        if step["content"].startswith(PREFILL):
            step["prefill"] = PREFILL
        calls = []
        for c in step.get("tool_calls") or []:
            try:
                calls.append((c["function"]["name"], json.loads(c["function"]["arguments"])))
            except json.JSONDecodeError:
                calls.append((c["function"]["name"], {}))
        gt = t.meta["ground_truth"]
        cases.append((t, official_valid(t.meta["category"], t.meta["task_id"], calls, gt)))
        right = gt_calls(gt, random.Random(t.id), alt=len(cases) % 2 == 0)
        cases.append((_reply(t.messages[:k], right, t.id + "#gt", t),
                      official_valid(t.meta["category"], t.meta["task_id"], right, gt)))
    n, agree, bad = _agreement(cases)
    valid = sum(official for _, official in cases)
    print(f"\nreference vs official BFCL checker (real rollouts + correct replies): {agree}/{n} = {agree / n:.1%}; "
          f"official valid {valid}, invalid {n - valid}")
    assert valid >= 100 and n - valid >= 100  # both verdicts well represented
    assert agree / n >= 0.95, bad[:10]


TASK = bfcl.load("parallel")[0]  # spotify.play x2: Taylor Swift 20, Maroon 5 15


def _t(text, task=TASK):
    return to_trajectory(task, [], raw=True, tid="x").__class__(
        "x", task.messages + [{"role": "assistant", "content": text, "token_ids": [0]}], task.tools,
        {"ground_truth": task.ground_truth})


def _call(name, args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def _crit(text):
    t = _t(text)
    c = check_critique(ReferenceCritic().check(t), t)
    if c.verdict == "error":
        assert message_text(t.messages[-1])[c.quote_at:].startswith(c.quote)
        assert lint_hint(c.hint, c.quote) is None
    return c


def test_parallel_any_order_is_ok():
    a, b = _call("spotify.play", {"artist": "Maroon 5", "duration": 15}), _call("spotify.play", {"artist": "taylor swift", "duration": 20})
    assert _crit(a + "\n" + b).verdict == "ok"


def test_wrong_value_quotes_the_value_and_hints_the_correct_one():
    c = _crit(_call("spotify.play", {"artist": "Taylor Swift", "duration": 20}) + "\n"
              + _call("spotify.play", {"artist": "Maroon 5", "duration": 51}))
    assert (c.category, c.quote) == ("wrong_value", "51") and "15" in c.hint


def test_wrong_function_quotes_the_name_and_names_the_right_one():
    c = _crit(_call("spotify.play_song", {"artist": "Taylor Swift", "duration": 20}) + "\n"
              + _call("spotify.play", {"artist": "Maroon 5", "duration": 15}))
    assert (c.category, c.quote) == ("wrong_function", "spotify.play_song") and "`spotify.play`" in c.hint


def test_missing_call_and_extra_call():
    one = _call("spotify.play", {"artist": "Taylor Swift", "duration": 20})
    c = _crit(one)
    assert c.category == "missing_call" and c.quote.endswith("</tool_call>") and "spotify.play" in c.hint
    three = one + "\n" + _call("spotify.play", {"artist": "Maroon 5", "duration": 15}) + "\n" + one
    c = _crit(three)
    assert (c.category, c.quote, c.quote_at) == ("extra_call", "<tool_call>", three.rindex("<tool_call>"))
    c = _crit("The songs are playing now.")
    assert c.category == "missing_call" and c.quote == "The songs are playing now."


def test_missing_and_unknown_parameter():
    c = _crit(_call("spotify.play", {"artist": "Taylor Swift"}) + "\n" + _call("spotify.play", {"artist": "Maroon 5", "duration": 15}))
    assert c.category == "missing_required" and c.quote == "}" and "`duration`" in c.hint and "20" in c.hint
    c = _crit(_call("spotify.play", {"artist": "Taylor Swift", "duration": 20, "shuffle": True}) + "\n"
              + _call("spotify.play", {"artist": "Maroon 5", "duration": 15}))
    assert (c.category, c.quote) == ("unknown_parameter", "shuffle")


def test_needs_ground_truth(samples):
    c = ReferenceCritic().check(samples["weather-ok"])
    assert c.verdict == "failed" and "ground_truth" in c.error
    t = _t("x")
    t.meta["ground_truth"] = {"not": "a list"}
    assert ReferenceCritic().check(t).verdict == "failed"
