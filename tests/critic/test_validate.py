"""Critique validation: every rule turns a bad critique into `failed` with a reason."""
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opsd_critic.validate import (
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


@pytest.mark.parametrize("text, n", [
    ("", 0), ("x", 2), ("_x", 2), ("abcdefgh", 3), ("abcdefg", 2), ("a, b.", 5), ("a b c", 4), ("{}", 2),
])
def test_approx_tokens_exact(text, n):
    """words x 1.3 (one more per 8 chars of a long identifier, `_x` is a word) + 1 per punctuation mark, rounded up."""
    assert approx_tokens(text) == n


@pytest.mark.parametrize("hint, quote, repeats", [
    ("Use x-5 here.", "-5", True),  # a core starting with punctuation: no word boundary on that side
    ("Use 5-x here.", "5-", True),
    ("Use my_rate.", "_rate", False),  # '_' is a word char: `_rate` inside `my_rate` is not the word
    ("Use _rate.", "_rate", True),
    ("Use rate_x.", "rate_", False),
    ("Use rate_ now.", "rate_", True),
])
def test_repeat_check_word_boundaries_at_punctuation_and_underscores(hint, quote, repeats):
    assert hint_repeats_quote(hint, quote) is repeats


def test_exact_reasons(samples):
    t = samples["weather-unknown-tool"]
    n = len(t.messages)

    def reason(**kw):
        return check_critique(_c(**kw), t).error

    assert lint_hint("", "x") == "hint is empty" and lint_hint(None, "x") == "hint is empty"
    assert reason(step=n) == f"invalid critique: step {n} is out of range: the trajectory has {n} messages (0..{n - 1})"
    assert reason(step=0).endswith("step 0 is a 'system' message, not an assistant message")
    assert reason(quote="") == "invalid critique: quote is empty"
    assert reason(category=5) == "invalid critique: category must be a string, got int"
    long = "x" * 100
    assert reason(quote=long) == f"invalid critique: quote {long[:80]!r} does not occur verbatim in message 2"
    assert reason(quote=long, quote_at=3) == f"invalid critique: quote {long[:80]!r} is not at char 3 of message 2"
    pre = dataclasses.replace(t, messages=[*t.messages[:2], {**t.messages[2], "prefill": "<tool_call>\n"}])
    assert check_critique(_c(quote="<tool_call>"), pre).error == (
        "invalid critique: quote starts inside the forced reply prefill '<tool_call>\\n' of message 2 (chars 0-11); "
        "quote only text the model generated")
    ok = "invalid critique: an 'ok' critique must not point to a step or quote"
    for extra in (dict(step=2), dict(quote="x"), dict(quote_at=0)):
        assert check_critique(Critique(t.id, "ok", **extra), t).error == ok


def test_overlapping_and_repeated_occurrences_are_ambiguous():
    from opsd.types import Trajectory

    t = Trajectory("o", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "aaa b b b"}])
    out = check_critique(Critique("o", "error", step=1, quote="aa", hint="Say it once.", category="x"), t)
    assert out.error == ("invalid critique: quote 'aa' occurs 2 times in message 1; quote a longer part of the "
                         "message that occurs only once")
    out = check_critique(Critique("o", "error", step=1, quote=" b", hint="Say it once.", category="x"), t)
    assert "occurs 3 times" in out.error
    out = check_critique(Critique("o", "error", step=1, quote="aaa", hint="Say it once.", category="x"), t)
    assert (out.verdict, out.quote_at) == ("error", 0)
    out = check_critique(Critique("o", "error", step=1, quote="b b b", hint="Say it once.", category="x"), t)
    assert (out.verdict, out.quote_at) == ("error", 4)
