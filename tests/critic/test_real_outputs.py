"""Schema+reference critics on real SmolLM2-135M BFCL rollouts (tests/fixtures/bfcl_rollouts.jsonl)."""
import asyncio
import collections
import json
from pathlib import Path

import pytest

from opsd_critic import make_critic
from opsd_critic.validate import check_critique, hint_repeats_quote
from opsd.io.trajectories import load_trajectories
from opsd.render import message_text

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bfcl_rollouts.jsonl"


PREFILL = "<tool_call>\n"  # the fixture's rollouts were generated with this reply prefill


@pytest.fixture(scope="module")
def judged():
    trajs = load_trajectories(FIXTURE)
    for t in trajs:
        if t.messages[-1]["content"].startswith(PREFILL):
            t.messages[-1]["prefill"] = PREFILL
    c = make_critic("schema+reference")
    # validated exactly as the runner does before writing (a lint failure would turn into "failed")
    return [(t, check_critique(asyncio.run(c.critique(t)), t)) for t in trajs]


def test_every_rollout_gets_a_valid_verdict(judged):
    assert len(judged) == 240
    for t, c in judged:
        assert c.verdict in ("error", "ok"), (t.id, c.error)
        if c.verdict == "error":
            text = message_text(t.messages[c.step])
            assert c.quote and text[c.quote_at:c.quote_at + len(c.quote)] == c.quote and c.hint
            assert c.quote_at >= len(PREFILL), (t.id, c.quote)  # never inside the forced prefill
            # the hint never repeats the wrong text (a correct name may contain it: density -> calculate_density)
            assert not hint_repeats_quote(c.hint, c.quote), (c.quote, c.hint)


def _first_name(text: str) -> str | None:
    """The called name, read with plain string operations (not the critic's parser)."""
    head = PREFILL + '{"name": "'
    if not text.startswith(head):
        return None
    name, sep, _ = text[len(head):].partition('"')
    return name if sep and "\\" not in name else None


def _expected_category(t) -> str:
    """The category from what the ROLLOUT recorded (its own JSON parser) and the tool schemas."""
    text = message_text(t.messages[-1])
    tools = {x["function"]["name"]: x["function"]["parameters"] for x in t.tools}
    name = _first_name(text)
    if name is not None and name not in tools:
        return "unknown_tool"  # the name comes first: every later error is conditioned on it
    err = t.meta.get("parse_error") or ""
    if err:
        # inside the arguments, before the parse error: a list, or a first key the function does not declare
        _, sep, rest = text.partition('"arguments": ')
        if sep and name in tools and rest.startswith("["):
            return "type_mismatch"
        if sep and name in tools and rest.startswith("{"):
            key, colon = rest[1:].lstrip().partition('"')[2].partition('"')[0], rest[1:].lstrip().startswith('"')
            if colon and key and key not in tools[name]["properties"] and '"' + key + '"' in rest:
                return "unknown_parameter"
        return "unparsable_call" if err.startswith("unterminated") else "invalid_json"
    (call,) = t.messages[-1]["tool_calls"]
    args, params = json.loads(call["function"]["arguments"]), tools[call["function"]["name"]]
    if set(args) - set(params["properties"]):
        return "unknown_parameter"
    if set(params.get("required", [])) - set(args):
        return "missing_required"
    return "reference"


def test_categories_match_what_the_rollout_recorded(judged):
    """Every reply's category agrees with one derived without the critic's code: the name by string
    operations, JSON validity from the rollout's own parser, keys from the schema."""
    mismatches = []
    for t, c in judged:
        want = _expected_category(t)
        if want == "reference":
            # schema-valid: the ground truth decides (it may also require a parameter the schema does not)
            ok = c.category in ("wrong_function", "wrong_value", "missing_call", "extra_call", "type_mismatch",
                                "enum_violation", "constraint_violation", "missing_required", "unknown_parameter")
        else:
            ok = c.category == want
        if not ok:
            mismatches.append((t.id, want, c.category, c.quote))
    cats = collections.Counter(c.category for _, c in judged)
    print("\ncategories on 240 real rollouts:", dict(cats.most_common()))
    assert not mismatches, mismatches[:10]
    assert cats["unknown_tool"] >= 100  # the base model hallucinates names in most replies
    assert cats["unparsable_call"] >= 20 and cats["invalid_json"] >= 1 and cats["unknown_parameter"] >= 1


def test_hallucinated_names_are_quoted_exactly(judged):
    for t, c in judged:
        if c.category == "unknown_tool" and _first_name(message_text(t.messages[-1])) not in (None, c.quote):
            continue  # an unknown name in a later call
        if c.category == "unknown_tool":
            name = _first_name(message_text(t.messages[-1]))
            assert (c.quote, c.quote_at) == (name, len(PREFILL + '{"name": "')), t.id
            valid = [x["function"]["name"] for x in t.tools]
            assert any(v in c.hint for v in valid)  # the hint lists valid names, never the wrong one
