"""Schema+reference critics on real SmolLM2-135M BFCL rollouts (tests/fixtures/bfcl_rollouts.jsonl)."""
import asyncio
import collections
import json
import re
from pathlib import Path

import pytest

from critic import make_critic
from critic.validate import check_critique, hint_repeats_quote
from opsd.io.trajectories import load_trajectories
from opsd.render import message_text

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bfcl_rollouts.jsonl"


@pytest.fixture(scope="module")
def judged():
    trajs = load_trajectories(FIXTURE)
    c = make_critic("schema+reference")
    # validated exactly as the runner does before writing (a lint failure would turn into "failed")
    return [(t, check_critique(asyncio.run(c.critique(t)), t)) for t in trajs]


def test_every_rollout_gets_a_valid_verdict(judged):
    assert len(judged) == 240
    for t, c in judged:
        assert c.verdict in ("error", "ok"), (t.id, c.error)
        if c.verdict == "error":
            text = message_text(t.messages[c.step])
            assert c.quote and c.quote in text and c.hint
            # the hint never repeats the wrong text (a correct name may contain it: density -> calculate_density)
            assert not hint_repeats_quote(c.hint, c.quote), (c.quote, c.hint)


def test_hallucinated_names_are_found_even_in_cut_off_calls(judged):
    names = {}
    for t, c in judged:
        m = re.match(r'<tool_call>\s*\{\s*"name"\s*:\s*"([^"\\]+)"', message_text(t.messages[-1]))
        valid = {x["function"]["name"] for x in t.tools}
        if m and m.group(1) not in valid:
            names[t.id] = m.group(1)
            assert c.category == "unknown_tool" and c.quote == m.group(1), (t.id, c.category, c.quote)
            # the hint lists valid names and never repeats the wrong one
            assert any(v in c.hint for v in valid)
    assert len(names) >= 100  # the base model hallucinates names in most replies


def test_category_mix_is_the_known_taxonomy(judged):
    cats = collections.Counter(c.category for _, c in judged if c.verdict == "error")
    assert set(cats) <= {"unknown_tool", "unparsable_call", "invalid_json", "unknown_parameter", "missing_required",
                         "type_mismatch", "enum_violation", "constraint_violation", "wrong_function", "wrong_value",
                         "missing_call", "extra_call"}, cats
    assert json.dumps(cats)  # serialisable summary
