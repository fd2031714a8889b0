"""A critique's quote maps to the tokens at `quote_at`, never to a guessed occurrence (issue 10, item 7),
and never to the forced reply prefill (item 5). Uses the embedded model's tokenizer only."""
from __future__ import annotations

import pytest

from opsd.hint.build import HintError, build_example
from opsd.render import render
from opsd.types import Critique, Trajectory

TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "town": "Paris"}}\n</tool_call>'
SECOND = TEXT.rindex("Paris")


def _traj(**step_extra) -> Trajectory:
    step = {"role": "assistant", "content": TEXT, "token_ids": None, **step_extra}
    return Trajectory("q", [{"role": "user", "content": "Weather in Paris?"}, step])


@pytest.fixture
def traj(smol_tokenizer):
    t = _traj()
    t.messages[1]["token_ids"] = smol_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    return t


def _crit(**kw) -> Critique:
    return Critique("q", "error", **{"step": 1, "quote": "Paris", "hint": "Use the city the user named.",
                                     "category": "wrong_value", **kw})


def test_quote_at_picks_the_occurrence(smol_tokenizer, traj):
    r = render(traj, smol_tokenizer)
    first, second = r.quote_span(1, "Paris", at=TEXT.index("Paris")), r.quote_span(1, "Paris", at=SECOND)
    assert first < second and "Paris" in r.text(*second)
    ex = build_example(traj, _crit(quote_at=SECOND), smol_tokenizer)
    assert tuple(ex.meta["quote_span"]) == second
    with pytest.raises(ValueError, match="not at char 3"):
        r.quote_span(1, "Paris", at=3)


def test_an_ambiguous_quote_without_quote_at_is_rejected_not_guessed(smol_tokenizer, traj):
    with pytest.raises(HintError) as e:
        build_example(traj, _crit(), smol_tokenizer)
    assert e.value.reason == "ambiguous_quote"
    ex = build_example(traj, _crit(quote="town"), smol_tokenizer)  # unique: no quote_at needed (old files)
    assert "town" in smol_tokenizer.decode(ex.student_ids[slice(*ex.meta["quote_span"])])


def test_a_quote_inside_the_reply_prefill_is_rejected(smol_tokenizer, traj):
    traj.messages[1]["prefill"] = "<tool_call>\n"
    with pytest.raises(HintError) as e:
        build_example(traj, _crit(quote="tool_call", quote_at=1), smol_tokenizer)
    assert e.value.reason == "quote_in_prefill"
    assert build_example(traj, _crit(quote_at=SECOND), smol_tokenizer).meta["quote_span"]
