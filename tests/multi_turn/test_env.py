"""BFCL's simulated environments: same results and states as BFCL's own executor, and model output never runs code."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from opsd.io.tasks import bfcl
from opsd.io.tasks import bfcl_multi_turn as mt
from opsd.io.tasks.bfcl_env import (
    ERROR_PREFIX,
    Environment,
    ToolTimeout,
    call_string,
    time_limit,
)


def test_ground_truth_replays_exactly_like_bfcl_executor():
    """Every ground-truth call of the four categories: our result text and state == BFCL's (which evals strings)."""
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils as mu
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import (
        _compare_instances,
    )

    d = bfcl.data_dir()
    n = 0
    for cat in mt.CATEGORIES:
        for item in bfcl._read_jsonl(d / f"BFCL_v4_{cat}.json"):
            gt = mt.entry(item["id"])["ground_truth"]
            lc = "long_context" in cat
            env = Environment(item["involved_classes"], item["initial_config"], long_context=lc)
            tag = "opsdtest" + uuid.uuid4().hex[:8]
            try:
                for turn in gt:
                    ours = [env.call(*env.parse_call(s)) for s in turn]
                    theirs, inst = mu.execute_multi_turn_func_call(turn, item["initial_config"], item["involved_classes"],
                                                                   tag, item["id"], long_context=lc, is_evaL_run=True)
                    assert ours == theirs, (item["id"], turn)
                    assert all(_compare_instances(env.instances[c], inst[c])[0] for c in inst), (item["id"], turn)
                    n += len(turn)
            finally:
                for k in [k for k in vars(mu) if k.startswith(tag)]:
                    delattr(mu, k)
    assert n > 4000  # every category was replayed


def test_a_state_change_is_seen_and_copies_are_independent():
    item = mt.entry("multi_turn_base_0")
    env = mt.environment(item)
    before = env.copy()
    assert env.same_state(before)
    out = env.call("cd", {"folder": "document"})
    assert not out.startswith(ERROR_PREFIX)
    assert env.same_state(before)  # BFCL's state check compares public attributes only ...
    assert env.changed_since(before) and not before.changed_since(before.copy())  # ... but cd steers what follows
    assert env.full_state()["GorillaFileSystem"]["_current_dir"].endswith("/document")
    env.call("mkdir", {"dir_name": "temp"})
    assert env.differences(before) == {"GorillaFileSystem": ["root"]} and not before.changed_since(mt.environment(item))


def test_model_output_never_reaches_eval():
    env = mt.environment(mt.entry("multi_turn_base_0"))
    for name in ("__import__", "eval", "exit", "open", "_load_scenario", "__init__", "os.system"):
        assert env.call(name, {}) == f"{ERROR_PREFIX}function {name!r} is not available"
    assert env.call("cd", "{'folder': 1}").startswith(ERROR_PREFIX)  # arguments must be a JSON object
    assert env.call("cd", {"folder": object()}).startswith(ERROR_PREFIX)
    # strings for BFCL's checker: only name(key=literal) with identifier names and keys
    assert call_string("cd", {"folder": "a'); __import__('os').system('x"}) == \
        "cd(folder=\"a'); __import__('os').system('x\")"
    assert call_string("cd", {"folder=__import__('os').system('x'),y": 1}) is None
    assert call_string("os.system", {}) is None
    assert call_string("cd", {"a": float("nan")}) is None
    assert call_string("cd", {"lambda": 1}) is None


def test_decoded_turns_drop_steps_bfcl_must_not_eval():
    t = mt.to_task(mt.entry("multi_turn_base_1"), "multi_turn_base")
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "open", "arguments": '{"file": "x", "mode": "w"}'}}]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "b", "type": "function", "function": {"name": "ls", "arguments": '{"a": true}'}}]}]
    assert mt.decoded_turns(msgs, t.meta) == [[[f"{mt.UNDEFINED}(file='x', mode='w')"], ["ls(a=True)"]]]
    msgs[1]["tool_calls"][0]["function"]["name"] = "made_up_name"  # BFCL's eval raises NameError on it: kept as is
    assert mt.decoded_turns(msgs, t.meta)[0][0] == ["made_up_name(file='x', mode='w')"]
    msgs[1]["tool_calls"][0]["function"]["name"] = "os.system"  # not a name: the step cannot be decoded
    assert mt.decoded_turns(msgs, t.meta) == [[["ls(a=True)"]]]
    msgs[1]["tool_calls"][0]["function"]["name"] = "__import__"
    assert mt.decoded_turns(msgs, t.meta)[0][0] == [f"{mt.UNDEFINED}(file='x', mode='w')"]


def test_runaway_math_is_refused_before_it_runs():
    env = Environment(["MathAPI"])
    t0 = time.monotonic()
    assert "refused" in env.call("power", {"base": 10, "exponent": 10**9})
    assert "refused" in env.call("square_root", {"number": 2, "precision": 10**8})
    assert time.monotonic() - t0 < 1.0
    assert json.loads(env.call("power", {"base": 2, "exponent": 10})) == {"result": 1024}


def test_a_slow_call_is_stopped_by_its_time_cap(monkeypatch):
    env = Environment(["MathAPI"], call_seconds=0.2)

    def spin(self, a, b):
        while True:
            pass

    from bfcl_eval.eval_checker.multi_turn_eval.func_source_code.math_api import MathAPI
    monkeypatch.setattr(MathAPI, "add", spin)
    t0 = time.monotonic()
    assert env.call("add", {"a": 1, "b": 2}) == f"{ERROR_PREFIX}timed out after 0.2 s"
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(ToolTimeout), time_limit(0.05):
        while True:
            pass


def test_only_simulated_classes_are_run():
    with pytest.raises(ValueError, match="needs the network"):
        Environment(["WebSearchAPI"])
    with pytest.raises(ValueError, match="not one of BFCL's simulated"):
        Environment(["os"])
