"""A rule critic never writes a critique that fails validation (issue 10, item 9).

Thousands of broken replies to real BFCL tasks (seeded text-level mutations of the ground-truth
calls, names and values drawn from the hint templates' own words, reply prefills declared or
not) and random text (hypothesis) go through every rule critic. Each critique must pass
`check_critique` unchanged: an `error` with a quote at `quote_at`, after the prefill, and a hint
that passes the lint; a `failed` verdict only for a reply with nothing generated to quote.
"""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsd_critic import make_critic
from opsd_critic.base import MIN_RULE_HINT_TOKENS
from opsd_critic.validate import check_critique
from opsd.io.tasks import bfcl
from opsd.render import prefill_length
from opsd.types import Trajectory
from tests.critic.perturb import gt_calls

PREFILL = "<tool_call>\n"
# words of the hint templates, JSON keys and punctuation: quotes made of them collide with hints
HINT_WORDS = ["name", "arguments", "function", "tools", "Call", "exist", "a", "the", "of", "That", "call", "must",
              "be", "one", "JSON", "valid", "argument", "parameters", "Use", "only", "request", "Fix", "Redo", "it",
              "per", "what", "was", "asked", ".", "-", "`", "integer", "number", "string", "text", "value", "should"]
CHARS = list('{}[]",: \n\\') + list("abcxyz019._-")


def _tasks():
    out = []
    for cat in ("simple_python", "multiple", "parallel", "parallel_multiple"):
        out += bfcl.load(cat)[:40]
    return out


TASKS = _tasks()


def _names(task) -> list[str]:
    return [t["function"]["name"] for t in task.tools]


def _word(rng: random.Random, task) -> str:
    names = _names(task)
    params = [p for t in task.tools for p in (t["function"].get("parameters") or {}).get("properties", {})]
    pool = HINT_WORDS + names + params + [n.split(".")[-1] for n in names] + [n[: len(n) // 2] for n in names]
    pool += ["imdb." + n for n in names] + [""]
    return rng.choice(pool)


def _mutate_calls(calls: list[tuple[str, dict]], rng: random.Random, task) -> list[tuple[str, dict]]:
    calls = [(n, dict(a)) for n, a in calls]
    k = rng.randrange(len(calls))
    name, args = calls[k]
    op = rng.randrange(7)
    if op == 0:
        calls[k] = (_word(rng, task), args)
    elif op == 1 and args:
        key = rng.choice(list(args))
        args[_word(rng, task)] = args.pop(key)
    elif op == 2 and args:
        args[rng.choice(list(args))] = rng.choice([_word(rng, task), "", 0, -1, 1.5, None, True, [], {}, [_word(rng, task)]])
    elif op == 3 and args:
        del args[rng.choice(list(args))]
    elif op == 4:
        calls.append(calls[k])
    elif op == 5 and len(calls) > 1:
        calls.pop(k)
    else:
        args[_word(rng, task)] = _word(rng, task)
    return calls


def _render(calls, rng: random.Random) -> str:
    parts = []
    for n, a in calls:
        body = json.dumps({"name": n, "arguments": a}, indent=rng.choice([None, None, 1]))
        parts.append("<tool_call>\n" + body + "\n</tool_call>")
    return "\n".join(parts)


def _mutate_text(text: str, rng: random.Random, task) -> str:
    for _ in range(rng.randrange(4)):
        op = rng.randrange(7)
        i = rng.randrange(len(PREFILL), len(text) + 1) if len(text) > len(PREFILL) else len(text)
        if op == 0:
            text = text[:i]  # cut off
        elif op == 1 and i < len(text):
            text = text[:i] + text[i + 1:]
        elif op == 2:
            text = text[:i] + rng.choice(CHARS) + text[i:]
        elif op == 3:
            j = min(len(text), i + rng.randrange(1, 30))
            text = text[:j] + text[i:j] * rng.randrange(1, 4) + text[j:]  # a generation loop
        elif op == 4:
            text = text[:i] + json.dumps(_word(rng, task)) + text[i:]
        elif op == 5:
            text = text + rng.choice(["", "\n", "\nDone.", "\n<tool_call>\n{", "\n```python\nprint(1)\n```"])
        else:
            text = text.replace('"name"', json.dumps(_word(rng, task)), 1)
    return text


def _reply(task, text: str, rng: random.Random) -> Trajectory:
    step = {"role": "assistant", "content": text, "token_ids": [0]}
    meta = {"ground_truth": task.ground_truth}
    where = rng.randrange(3) if text.startswith(PREFILL) else 2
    if where == 0:
        step["prefill"] = PREFILL
    elif where == 1:
        meta["prefill"] = PREFILL
    return Trajectory(task.id, task.messages + [step], task.tools, meta)


def _broken_replies(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        calls = gt_calls(task.ground_truth, rng, alt=rng.random() < 0.5)
        for _ in range(rng.randrange(1, 3)):
            calls = _mutate_calls(calls, rng, task)
        text = _render(calls, rng)
        if rng.random() < 0.6:
            text = _mutate_text(text, rng, task)
        if rng.random() < 0.1:
            text = rng.choice(["", "I will call it.\n", "  \n"]) + text
        yield _reply(task, text, rng)


CRITICS = {name: make_critic(name) for name in ("schema", "reference", "schema+reference")}
CRITICS["schema@min-budget"] = make_critic("schema", max_hint_tokens=MIN_RULE_HINT_TOKENS)
CRITICS["reference@min-budget"] = make_critic("reference", max_hint_tokens=MIN_RULE_HINT_TOKENS)


def _judge(critic, t: Trajectory):
    c = critic.check(t) if hasattr(critic, "check") else _chain(critic, t)
    checked = check_critique(c, t, max_hint_tokens=critic.max_hint_tokens)
    assert checked == c, (t.id, t.messages[-1]["content"], c, checked.error)
    if c.verdict == "error":
        assert c.quote_at is not None and c.quote_at >= prefill_length(t, c.step), c
    if c.verdict == "failed":
        assert "nothing after its reply prefill" in c.error, c
    return c


def _chain(critic, t):
    c = critic.first.check(t)
    return critic.second.check(t) if c.verdict == "ok" else c


@pytest.mark.parametrize("name", sorted(CRITICS))
def test_rule_critics_never_fail_validation_on_broken_replies(name):
    verdicts = {"error": 0, "ok": 0, "failed": 0}
    for t in _broken_replies(1500, seed=hash(name) % 1000):
        verdicts[_judge(CRITICS[name], t).verdict] += 1
    print(f"\n{name}: {verdicts}")
    assert verdicts["error"] >= 1000  # the generator does produce errors, of every kind


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TASKS[::8]), st.lists(st.sampled_from(CHARS + HINT_WORDS), max_size=30).map("".join),
       st.sampled_from(["", PREFILL, PREFILL + '{"name": "']), st.booleans())
def test_rule_critics_never_fail_validation_on_random_text(task, tail, head, declare):
    text = head + tail
    step = {"role": "assistant", "content": text, "token_ids": [0]}
    if declare and head:
        step["prefill"] = head
    t = Trajectory(task.id, task.messages + [step], task.tools, {"ground_truth": task.ground_truth})
    for critic in CRITICS.values():
        _judge(critic, t)
