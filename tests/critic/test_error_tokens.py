"""Which tokens a rule critic's quote covers, per category (data/README.md, "Which tokens a quote covers").

Each case is a reply with the expected error tokens marked «like this»: the critique must quote
exactly the marked text at exactly that offset (`quote_at`), and never start inside the reply
prefill. A quote one char too early or too late, or a guessed occurrence, fails.
"""
from __future__ import annotations

import pytest

from opsd_critic.reference import ReferenceCritic
from opsd_critic.schema import SchemaCritic
from opsd_critic.validate import check_critique
from opsd.io.tasks import bfcl
from opsd.render import message_text
from opsd.types import Trajectory

CALL = '<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'
W, F = "get_weather", "search_flights"


def _marked(reply: str) -> tuple[str, str, int]:
    """(text without markers, marked quote, its offset)."""
    a = reply.index("«")
    b = reply.index("»")
    return reply.replace("«", "").replace("»", ""), reply[a + 1:b], a


SCHEMA_CASES = {
    "unknown_tool": CALL.format(name="«weather.now»", args="{}"),
    "unknown_tool/empty name": '<tool_call>\n{"name": "«"», "arguments": {}}\n</tool_call>',
    "invalid_json/closed too early": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}\n«</tool_call>»',
    "invalid_json/missing comma": '<tool_call>\n{"name": "get_weather" «"arguments"»: {"city": "Oslo"}}\n</tool_call>',
    "invalid_json/two values": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo" «"Paris"»}}\n</tool_call>',
    "unparsable_call/unterminated string": '<tool_call>\n{"name": "get_weather", "arguments": {"city": «"Par»',
    "unparsable_call/cut off": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris«"»',
    "unparsable_call/cut off in whitespace": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"«,\n    »',
    "unparsable_call/repeated name key": '<tool_call>\n{"name": "get_weather", «"name"»: "get_weather", "name": "get',
    "unparsable_call/not an object": '<tool_call>\n«[»"get_weather"]\n</tool_call>',
    "unparsable_call/no name": '<tool_call>\n{"arguments": {"city": "Oslo"}«}»\n</tool_call>',
    "unparsable_call/next call opened": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"\n«<tool_call>»',
    "unknown_parameter": CALL.format(name=W, args='{"city": "Oslo", "«town»": "Oslo"}'),
    "missing_required": CALL.format(name=F, args='{"origin": "SFO", "passengers": 2«}»'),
    "missing_required/empty object": CALL.format(name=W, args="{«}»"),
    "type_mismatch": CALL.format(name=F, args='{"origin": "A", "destination": "B", "passengers": «"two"»}'),
    "type_mismatch/not an object": CALL.format(name=W, args='«["Oslo"]»'),
    "enum_violation": CALL.format(name=W, args='{"city": "Oslo", "unit": "«kelvin»"}'),
    "enum_violation/empty string": CALL.format(name=W, args='{"city": "Oslo", "unit": "«"»}'),
    "type_mismatch/number for an enum of strings": CALL.format(name=W, args='{"city": "Oslo", "unit": «3»}'),
    "constraint_violation": CALL.format(name=F, args='{"origin": "A", "destination": "B", "passengers": «0»}'),
    "constraint_violation/two chars": CALL.format(name=F, args='{"origin": "A", "destination": "B", "passengers": «-5»}'),
    "missing_required/no arguments key": '<tool_call>\n{"name": "get_weather"«}»\n</tool_call>',
}
TOOL_ERROR_CASES = {
    "tool_error/value named": (CALL.format(name=W, args='{"city": "«Atlantis»"}'), '{"error": "unknown city Atlantis"}'),
    "tool_error/nothing named": (CALL.format(name=W, args='«{"city": "Paris"}»'), "Error: service unavailable"),
}


def _traj(samples, reply: str, tool_result: str | None = None, prefill: str | None = None) -> Trajectory:
    base = samples["weather-ok"]
    step = {"role": "assistant", "content": reply, "token_ids": [0]}
    if prefill is not None:
        step["prefill"] = prefill
    extra = [{"role": "tool", "tool_call_id": "call_0", "content": tool_result}] if tool_result else []
    return Trajectory("t", base.messages[:2] + [step] + extra, base.tools)


def _assert_quotes(c, t, quote: str, at: int, category: str):
    c = check_critique(c, t)
    assert (c.verdict, c.category, c.quote, c.quote_at) == ("error", category, quote, at), c.error
    assert message_text(t.messages[c.step])[at:at + len(quote)] == quote


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_schema_quotes_exactly_the_error_tokens(samples, case):
    text, quote, at = _marked(SCHEMA_CASES[case])
    t = _traj(samples, text)
    _assert_quotes(SchemaCritic().check(t), t, quote, at, case.split("/")[0])


@pytest.mark.parametrize("case", sorted(TOOL_ERROR_CASES))
def test_tool_error_quotes_exactly_the_error_tokens(samples, case):
    reply, result = TOOL_ERROR_CASES[case]
    text, quote, at = _marked(reply)
    t = _traj(samples, text, result)
    _assert_quotes(SchemaCritic().check(t), t, quote, at, "tool_error")


TASK = bfcl.load("parallel")[0]  # spotify.play x2: Taylor Swift 20, Maroon 5 15
SWIFT, MAROON = '{"artist": "Taylor Swift", "duration": 20}', '{"artist": "Maroon 5", "duration": 15}'
REFERENCE_CASES = {
    "wrong_function": CALL.format(name="«spotify.play_song»", args=SWIFT) + "\n" + CALL.format(name="spotify.play", args=MAROON),
    "wrong_value/string": CALL.format(name="spotify.play", args='{"artist": "«Taylor Smith»", "duration": 20}') + "\n"
    + CALL.format(name="spotify.play", args=MAROON),
    "wrong_value/number": CALL.format(name="spotify.play", args=SWIFT) + "\n"
    + CALL.format(name="spotify.play", args='{"artist": "Maroon 5", "duration": «51»}'),
    "wrong_value/wrong type": CALL.format(name="spotify.play", args=SWIFT) + "\n"
    + CALL.format(name="spotify.play", args='{"artist": "Maroon 5", "duration": «"15"»}'),
    "unknown_parameter": CALL.format(name="spotify.play", args='{"artist": "Taylor Swift", "duration": 20, "«shuffle»": true}')
    + "\n" + CALL.format(name="spotify.play", args=MAROON),
    "missing_required": CALL.format(name="spotify.play", args='{"artist": "Taylor Swift"«}»') + "\n"
    + CALL.format(name="spotify.play", args=MAROON),
    "missing_call/closed": CALL.format(name="spotify.play", args=SWIFT)[:-len("</tool_call>")] + "«</tool_call>»",
    "missing_call/never closed": CALL.format(name="spotify.play", args=SWIFT)[:-len("}\n</tool_call>")] + "«}»",
    "missing_call/no call": "«The songs are playing now.»\nEnjoy!",
    "extra_call": CALL.format(name="spotify.play", args=SWIFT) + "\n" + CALL.format(name="spotify.play", args=MAROON)
    + "\n«<tool_call>»" + CALL.format(name="spotify.play", args=MAROON)[len("<tool_call>"):],
}


def _task_traj(text: str, prefill: str | None = None) -> Trajectory:
    step = {"role": "assistant", "content": text, "token_ids": [0]}
    if prefill is not None:
        step["prefill"] = prefill
    return Trajectory("x", TASK.messages + [step], TASK.tools, {"ground_truth": TASK.ground_truth})


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_reference_quotes_exactly_the_error_tokens(case):
    text, quote, at = _marked(REFERENCE_CASES[case])
    t = _task_traj(text)
    _assert_quotes(ReferenceCritic().check(t), t, quote, at, case.split("/")[0])


# the reply prefill is forced, not generated: no quote starts inside it (issue 10, item 5)
PREFILL = "<tool_call>\n"
PREFILL_CASES = {
    "code instead of JSON": ("<tool_call>\n\n«`»``python\ndef gcd_lcm(a, b):\n", "unparsable_call"),
    "only whitespace generated": ("<tool_call>\n«\n\n»", "unparsable_call"),
    "cut off right after the brace": ('<tool_call>\n«{»', "unparsable_call"),
    "prefill ends inside the name": ('<tool_call>\n{"name": "spo«tify.play_song»", "arguments": ' + SWIFT + "}\n</tool_call>",
                                     "wrong_function"),
}


@pytest.mark.parametrize("case", sorted(PREFILL_CASES))
@pytest.mark.parametrize("where", ["message", "meta"])
def test_no_quote_starts_inside_the_reply_prefill(case, where):
    reply, category = PREFILL_CASES[case]
    text, quote, at = _marked(reply)
    prefill = PREFILL if "name" not in case else text[:at]
    t = _task_traj(text, prefill if where == "message" else None)
    if where == "meta":
        t.meta["prefill"] = prefill
    for critic in (ReferenceCritic(), SchemaCritic()):
        c = check_critique(critic.check(t), t)
        want = "unknown_tool" if critic.name == "schema" and category == "wrong_function" else category
        assert (c.verdict, c.category, c.quote, c.quote_at) == ("error", want, quote, at), (critic.name, c)


def test_a_reply_that_is_only_the_prefill_fails_with_a_reason():
    t = _task_traj(PREFILL, PREFILL)
    for critic in (ReferenceCritic(), SchemaCritic()):
        c = check_critique(critic.check(t), t)
        assert c.verdict == "failed" and "nothing after its reply prefill" in c.error, c
    t = _task_traj(PREFILL)  # without the prefill declared the tag is the model's: quoted as cut off
    c = check_critique(SchemaCritic().check(t), t)
    assert (c.verdict, c.quote, c.quote_at) == ("error", ">\n", len(PREFILL) - 2)
