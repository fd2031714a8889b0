"""Hinted examples on the real SmolLM2 tokenizer: every placement and span kind, and the skip reasons."""
from __future__ import annotations

import dataclasses

import pytest

from opsd.hint.build import HintError, build_example, build_examples, hint_message_text
from opsd.render import message_text, render
from opsd.types import Critique, Trajectory

CASES = [(p, s) for p in ("user", "system", "inline") for s in ("quote", "step_from_error", "step") if (p, s) != ("inline", "step")]


def errors(critiques):
    return [c for c in critiques if c.verdict == "error"]


def by_id(trajectories):
    return {t.id: t for t in trajectories}


def test_sample_critiques_are_valid(trajectories, critiques):
    """Quotes are verbatim in the step's text; hints never repeat the erroneous text (FINDINGS)."""
    trajs = by_id(trajectories)
    assert len(errors(critiques)) == 6
    for c in critiques:
        t = trajs[c.trajectory_id]
        assert c.trajectory_hash == t.content_hash()
        if c.verdict == "error":
            assert t.messages[c.step]["role"] == "assistant"
            assert c.quote in message_text(t.messages[c.step])
            core = c.quote.strip(' ",{}\n:')
            assert not core or core not in c.hint, (c.trajectory_id, core)  # a `}` quote has no core to repeat


@pytest.mark.parametrize("placement,span", CASES)
def test_spans_cover_same_tokens(smol_tok, trajectories, critiques, placement, span):
    trajs = by_id(trajectories)
    for c in errors(critiques):
        traj = trajs[c.trajectory_id]
        ex = build_example(traj, c, smol_tok, placement=placement, span=span)
        (s0, s1), (t0, t1) = ex.student_span, ex.teacher_span
        assert ex.student_ids[s0:s1] == ex.teacher_ids[t0:t1]
        assert len(ex.student_ids) == s1 and len(ex.teacher_ids) == t1  # cut after the last target token
        assert len(ex.teacher_ids) > len(ex.student_ids)
        # the student is exactly the original rendering, truncated
        full = render(traj, smol_tok)
        assert ex.student_ids == full.input_ids[:s1]
        b0, b1 = full.body_spans[c.step]
        q0, q1 = ex.meta["quote_span"]
        assert c.quote.strip() in smol_tok.decode(full.input_ids[q0:q1])
        if span == "quote":
            assert (s0, s1) == (q0, q1)
        elif span == "step_from_error":
            assert s0 == q0 and s1 == b1 + 1 and smol_tok.decode(ex.student_ids[-1:]) == "<|im_end|>"
        else:
            assert (s0, s1) == (b0, b1 + 1)
        hinted = smol_tok.decode(ex.teacher_ids)
        assert c.hint.strip() in hinted
        if placement == "user":
            assert hint_message_text(c.hint) in hinted
            # the hint is a user turn right above the step: nothing but the assistant header in between
            tail = smol_tok.decode(ex.teacher_ids[:t0])
            assert tail.rstrip().endswith("<|im_start|>assistant") or "<|im_start|>assistant\n" in tail[-200:]
            assert tail.rfind(c.hint.strip()) > tail.rfind("<|im_start|>user")
        if placement == "inline":
            assert f"<hint>{c.hint.strip()}</hint>" in hinted


def test_inline_tags_and_bad_combination(smol_tok, trajectories, critiques):
    c = errors(critiques)[0]
    t = by_id(trajectories)[c.trajectory_id]
    ex = build_example(t, c, smol_tok, placement="inline", inline_tags=("<think>", "</think>"))
    text = smol_tok.decode(ex.teacher_ids)
    assert f"<think>{c.hint}</think>" + c.quote in text  # right before the quoted error
    with pytest.raises(ValueError, match="inline"):
        build_example(t, c, smol_tok, placement="inline", span="step")
    with pytest.raises(ValueError, match="placement"):
        build_example(t, c, smol_tok, placement="footer")


def test_system_placement_without_system_message(smol_tok, trajectories, critiques):
    c = next(c for c in errors(critiques) if c.trajectory_id == "currency-bad-json")  # no system message
    ex = build_example(by_id(trajectories)[c.trajectory_id], c, smol_tok, placement="system")
    assert c.hint in smol_tok.decode(ex.teacher_ids)


def test_token_ids_steps_are_used_verbatim(smol_tok):
    """A step carrying generated token_ids keeps them exactly, even when not canonical tokenisation."""
    text = '<tool_call>\n{"name": "area.get", "arguments": {}}\n</tool_call>'
    ids = [smol_tok.convert_tokens_to_ids(ch) for ch in ["<", "tool"]] + smol_tok(text[5:], add_special_tokens=False)["input_ids"]
    traj = Trajectory("gen", [{"role": "user", "content": "area of a circle r=2"},
                              {"role": "assistant", "content": smol_tok.decode(ids), "token_ids": ids}])
    c = Critique("gen", "error", 1, "area.get", "The only valid tool is circle_area.", trajectory_hash=traj.content_hash())
    body = render(traj, smol_tok).body_spans[1]
    for placement, span in (("user", "step"), ("inline", "step_from_error")):
        ex = build_example(traj, c, smol_tok, placement=placement, span=span)
        assert ex.student_ids[body[0]:body[1]] == ids


def test_skips_are_counted(smol_tok, trajectories, critiques):
    errs = errors(critiques)
    bad = [
        dataclasses.replace(errs[0], quote="no such text"),  # quote_not_found
        dataclasses.replace(errs[1], step=1),  # not_assistant
        dataclasses.replace(errs[2], step=99),  # bad_step
        dataclasses.replace(errs[3], trajectory_hash="0" * 16),  # hash_mismatch
        dataclasses.replace(errs[4], hint=" "),  # no_hint
        dataclasses.replace(errs[5], trajectory_id="missing"),  # no_trajectory
        Critique("weather-ok", "failed", error="timeout"),
        errs[0], errs[0],  # duplicate
    ]
    examples, counts = build_examples(trajectories, bad + [c for c in critiques if c.verdict == "ok"], smol_tok)
    assert len(examples) == 1
    assert dict(counts) == {"quote_not_found": 1, "not_assistant": 1, "bad_step": 1, "hash_mismatch": 1, "no_hint": 1,
                            "no_trajectory": 1, "verdict_failed": 1, "used": 1, "duplicate": 1, "verdict_ok": 2}
    with pytest.raises(HintError) as e:
        build_example(by_id(trajectories)[errs[0].trajectory_id], bad[0], smol_tok)
    assert e.value.reason == "quote_not_found"
