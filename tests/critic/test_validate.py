"""Critique validation: every rule turns a bad critique into `failed` with a reason."""
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from critic.validate import (
    approx_tokens,
    check_critique,
    hint_repeats_quote,
    lint_hint,
    quote_core,
)
from opsd.types import Critique

GOOD = dict(step=2, quote="weather.get_current", hint="Call one of: get_weather, search_flights.",
            category="unknown_tool")


def _c(**kw):
    return Critique("weather-unknown-tool", kw.pop("verdict", "error"), **{**GOOD, **kw})


def test_valid_critique_passes_with_its_offset_filled_in(samples):
    c = _c()
    out = check_critique(c, samples["weather-unknown-tool"])
    assert out == dataclasses.replace(c, quote_at=22)  # '<tool_call>\n{"name": "' is 22 chars
    assert check_critique(out, samples["weather-unknown-tool"]) is out


@pytest.mark.parametrize("change, reason", [
    (dict(step=7), "out of range"),
    (dict(step=-1), "out of range"),
    (dict(step=1), "'user' message"),
    (dict(step="2"), "integer"),
    (dict(quote="weather.get_forecast"), "does not occur verbatim"),
    (dict(quote=""), "quote is empty"),
    (dict(hint="  "), "hint is empty"),
    (dict(hint="word " * 80), "too long"),
    (dict(hint="Do not call weather.get_current again."), "repeats the erroneous text"),
    (dict(quote_at=21), "is not at char 21 of message 2"),
    (dict(quote_at=-1), "is not at char -1"),
    (dict(quote_at="22"), "quote_at must be an integer"),
    (dict(quote_at=True), "quote_at must be an integer"),
    (dict(quote="tool_call"), "occurs 2 times in message 2"),  # ambiguous: never guessed
    (dict(quote="<tool_call>"), "inside the forced reply prefill"),
])
def test_each_rule_fails_the_critique_with_its_reason(samples, change, reason):
    t = samples["weather-unknown-tool"]
    t = dataclasses.replace(t, messages=[*t.messages[:2], {**t.messages[2], "prefill": "<tool_call>\n"}])
    out = check_critique(_c(**change), t)
    assert out.verdict == "failed" and reason in out.error
    assert out.step == _c(**change).step  # what was proposed is kept for inspection


def test_ok_and_failed_shapes(samples):
    t = samples["weather-ok"]
    assert check_critique(Critique(t.id, "ok"), t).verdict == "ok"
    assert check_critique(Critique(t.id, "ok", step=2, quote="x"), t).verdict == "failed"
    assert check_critique(Critique(t.id, "failed"), t).error == "invalid critique: failed critique has no error reason"


def test_hint_limit_is_configurable(samples):
    t = samples["weather-unknown-tool"]
    assert check_critique(_c(), t, max_hint_tokens=5).verdict == "failed"
    assert check_critique(_c(), t, max_hint_tokens=40).verdict == "error"


def test_repeat_check_is_whole_word_and_case_sensitive():
    assert quote_core('"rate"') == "rate"
    assert hint_repeats_quote("Remove the rate argument.", '"rate"')
    # other case = other tokens: naming the correct function of a case-only mistake is the fix
    assert not hint_repeats_quote("Call calculate_final_temperature.", "Calculate_Final_Temperature")
    assert not hint_repeats_quote("Call one of: number_theory.gcd.", "gcd")  # part of the correct dotted name
    assert hint_repeats_quote("Do not call gcd.", "gcd") and hint_repeats_quote("gcd, again", "gcd")
    assert not hint_repeats_quote("Use to_currency; the answer must be accurate.", '"rate"')
    assert not hint_repeats_quote("`num` should be 25.", "2}")  # 25 is not the wrong value 2
    assert hint_repeats_quote("`num` should be 2.", "2}")
    assert not hint_repeats_quote("Call calc_area_circle.", "calc_area")
    assert not hint_repeats_quote("anything", "}\n")  # no core: nothing to repeat


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"[A-Za-z][A-Za-z0-9_.]{0,12}[A-Za-z0-9]", fullmatch=True), st.text(max_size=20),
       st.text(max_size=20))
def test_a_hint_containing_the_quote_never_passes(word, before, after):
    hint = f"{before} {word} {after}"
    assert lint_hint(hint, f'"{word}"', max_hint_tokens=10_000) is not None


def test_approx_tokens_grows_with_text():
    assert approx_tokens("") == 0
    assert 1 <= approx_tokens("hello") <= 3
    assert approx_tokens("a b c d e f g h") > approx_tokens("a b c")
    assert approx_tokens("extraordinarily_long_identifier_name") > approx_tokens("short")
