"""opsd.hint.build on a small hand-made trajectory: every HintError reason with its message, the step and
prefill boundaries, the hinted message's role, the example's meta, and what build_examples counts.
Found with `make mutation` (the sample-data tests left these unchecked)."""
from __future__ import annotations

import dataclasses

import pytest

import opsd.hint.build as build
from opsd.hint.build import HintError, build_example, build_examples, hint_message_text
from opsd.render import message_text, render
from opsd.types import Critique, Trajectory

TEXT = '<tool_call>\n{"name": "pay", "arguments": {"amount": 1000, "note": "rent"}}\n</tool_call>'
PREFILL = "<tool_call>\n"
LONG = "a fairly long note that the model wrote out twice, more than sixty chars"  # 72 chars


def traj(text=TEXT, tid="t1", **asst) -> Trajectory:
    return Trajectory(tid, [{"role": "user", "content": "Pay 100 for the rent."},
                            {"role": "assistant", "content": text, **asst}])


def crit(t: Trajectory, **kw) -> Critique:
    kw = {"step": 1, "quote": "1000", "hint": "The user asked for 100.", "category": "wrong_value", **kw}
    return Critique(t.id, "error", trajectory_hash=t.content_hash(), **kw)


def error_of(t, c, tok, **kw) -> HintError:
    with pytest.raises(HintError) as e:
        build_example(t, c, tok, **kw)
    return e.value


def test_hint_error_is_reason_then_message():
    e = HintError("bad_step", "step 9 out of range")
    assert e.reason == "bad_step" and str(e) == "bad_step: step 9 out of range"


@pytest.mark.parametrize("change,reason,message", [
    ({"verdict": "ok"}, "verdict_ok", "critique of 't1' has verdict 'ok'"),
    ({"trajectory_id": "t2"}, "id_mismatch", "critique is for 't2', trajectory is 't1'"),
    ({"step": 2}, "bad_step", "step 2 out of range for 2 messages in 't1'"),
    ({"step": -1}, "bad_step", "step -1 out of range for 2 messages in 't1'"),
    ({"step": 0}, "not_assistant", "message 0 of 't1' is a 'user' message"),
    ({"quote": None}, "no_quote", "critique of 't1' has an empty quote"),
    ({"quote": ""}, "no_quote", "critique of 't1' has an empty quote"),
    ({"hint": None}, "no_hint", "critique of 't1' has an empty hint"),
    ({"hint": "\n"}, "no_hint", "critique of 't1' has an empty hint"),
    ({"quote": "00"}, "ambiguous_quote", "quote '00' occurs more than once in message 1 of 't1' and the critique "
                                         "has no quote_at to say which"),  # overlapping: "1000" holds "00" at +0 and +1
    ({"quote": "999"}, "quote_not_found", "'t1': "),
])
def test_each_unusable_critique_raises_its_reason(smol_tok, change, reason, message):
    t = traj()
    e = error_of(t, dataclasses.replace(crit(t), **change), smol_tok)
    assert e.reason == reason
    assert str(e).startswith(f"{reason}: {message}")


def test_first_and_last_message_are_in_range(smol_tok):
    t = Trajectory("t1", [{"role": "assistant", "content": TEXT}])
    assert build_example(t, crit(t, step=0), smol_tok).meta["step"] == 0
    assert error_of(t, crit(t, step=1), smol_tok).reason == "bad_step"


def test_messages_quote_at_most_60_chars_of_a_long_quote(smol_tok):
    t = traj('<tool_call>\n{"name": "log", "arguments": {"a": "%s", "b": "%s"}}\n</tool_call>' % (LONG, LONG))
    e = error_of(t, crit(t, quote=LONG), smol_tok)
    assert e.reason == "ambiguous_quote" and f"quote {LONG[:60]!r} occurs" in str(e)
    assert build_example(t, crit(t, quote=LONG, quote_at=message_text(t.messages[1]).rfind(LONG)), smol_tok)
    long_prefill = TEXT[:70]
    t = traj(prefill=long_prefill)
    e = error_of(t, crit(t, quote=long_prefill, quote_at=0), smol_tok)
    assert str(e) == (f"quote_in_prefill: quote {long_prefill[:60]!r} starts inside the reply prefill of message 1 "
                      f"of 't1': those tokens were forced, not generated")


def test_a_quote_may_start_where_the_prefill_ends_not_before(smol_tok):
    t = traj(prefill=PREFILL)
    for at in (0, 5, len(PREFILL) - 1):
        q = TEXT[at:len(PREFILL) + 2]
        assert error_of(t, crit(t, quote=q, quote_at=at), smol_tok).reason == "quote_in_prefill"
    ex = build_example(t, crit(t, quote='{"name"', quote_at=len(PREFILL)), smol_tok)
    assert '{"name"' in smol_tok.decode(ex.student_ids[slice(*ex.student_span)])


def test_user_placement_inserts_a_user_turn(smol_tok):
    t = traj()
    c = crit(t)
    ex = build_example(t, c, smol_tok, placement="user", span="step")
    hinted = smol_tok.decode(ex.teacher_ids)
    assert f"<|im_start|>user\n{hint_message_text(c.hint)}<|im_end|>\n<|im_start|>assistant\n" in hinted
    assert hinted.count("<|im_start|>user\n") == 2


def test_bad_option_messages(smol_tok):
    t = traj()
    with pytest.raises(ValueError, match=r"^span must be one of \(.*\), got 'all'$"):
        build_example(t, crit(t), smol_tok, span="all")
    with pytest.raises(ValueError, match=r"^placement 'inline' puts the hint inside the step, so span 'step' cannot "
                                         r"be aligned; use span 'quote' or 'step_from_error'$"):
        build_example(t, crit(t), smol_tok, placement="inline", span="step")


def test_meta_records_where_the_example_came_from(smol_tok):
    t = traj()
    c = crit(t)
    ex = build_example(t, c, smol_tok, placement="user", span="step")
    q0, q1 = render(Trajectory("t1", t.messages), smol_tok).quote_span(1, "1000")
    assert ex.meta == {"trajectory_id": "t1", "trajectory_hash": t.content_hash(), "step": 1, "category": "wrong_value",
                       "placement": "user", "span": "step", "quote_span": [q0, q1],
                       "hint_tokens": len(ex.teacher_ids) - len(ex.student_ids)}
    assert ex.meta["hint_tokens"] > 0


def test_a_misaligned_template_is_a_hint_error(smol_tok, monkeypatch):
    def misaligned(*a, **kw):
        raise ValueError("student and teacher spans do not cover the same tokens")

    monkeypatch.setattr(build, "HintedExample", misaligned)
    e = error_of(traj(), crit(traj()), smol_tok)
    assert e.reason == "misaligned"
    assert str(e) == "misaligned: 't1': student and teacher spans do not cover the same tokens"


class BosTokenizer:
    """The SmolLM2 tokenizer, adding a BOS when asked for special tokens (as Llama 3's does)."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text, add_special_tokens=True, **kw):
        out = self._tok(text, add_special_tokens=False, **kw)
        if add_special_tokens:
            out["input_ids"] = [self._tok.bos_token_id or 1] + out["input_ids"]
        return out

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_inline_hint_tokens_have_no_special_tokens(smol_tok):
    t = traj()
    c = crit(t)
    ex = build_example(t, c, BosTokenizer(smol_tok), placement="inline")
    q0 = ex.meta["quote_span"][0]
    want = smol_tok("<hint>" + c.hint + "</hint>", add_special_tokens=False)["input_ids"]
    assert ex.teacher_ids[:q0] == ex.student_ids[:q0]
    assert ex.teacher_ids[q0:q0 + len(want)] == want and ex.meta["hint_tokens"] == len(want)


def test_build_examples_counts_every_skip(smol_tok):
    t, other = traj(), traj(tid="t3")
    ok = crit(t)
    critiques = [
        ok, ok, ok,  # used, duplicate, duplicate
        crit(t, quote='"rent"'),  # used
        dataclasses.replace(crit(t, quote="pay"), trajectory_hash=None),  # unhashed, used
        dataclasses.replace(crit(t, quote="amount"), trajectory_hash=None),  # unhashed, used
        dataclasses.replace(ok, trajectory_id="gone"), dataclasses.replace(ok, trajectory_id="gone2"),
        dataclasses.replace(crit(other), trajectory_hash="f" * 16), dataclasses.replace(crit(other, quote="pay"), trajectory_hash="0" * 16),
        crit(other, quote="note", hint=" "), crit(other, quote="rent", hint=""),
        Critique("t1", "ok"), Critique("t3", "ok"),
    ]
    examples, counts = build_examples([t, other], critiques, smol_tok, placement="system", span="step_from_error")
    assert dict(counts) == {"used": 4, "duplicate": 2, "unhashed": 2, "no_trajectory": 2, "hash_mismatch": 2,
                            "no_hint": 2, "verdict_ok": 2}
    assert len(examples) == 4
    assert {(e.meta["placement"], e.meta["span"]) for e in examples} == {("system", "step_from_error")}


def test_a_whitespace_quote_is_a_real_error_token(smol_tok):
    """A raw newline inside a JSON string is the decoder's error point (the rule critics quote it); the example
    is built on that token. (11 of 96 round-1 critiques of the demo were dropped as `no_quote` before.)"""
    text = '<tool_call>\n"1. Calculate the value.\n2. Calculate the rest.'
    t = traj(text)
    at = text.index("\n", len(PREFILL))
    ex = build_example(t, crit(t, quote="\n", quote_at=at, category="unparsable_call"), smol_tok)
    a, b = ex.student_span
    assert smol_tok.decode(ex.student_ids[a:b]) == "\n"

