"""Every error of the erroneous step in one example: the all_errors critics, the hinted example, the masked loss.

A critique of several errors spans from the first error to the last; only the error tokens carry loss. Since
attention is causal, that loss must equal the sum of the losses of one-error records cut after each error.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch

from opsd_critic import make_critic
from opsd_critic.base import combine_errors
from opsd_critic.validate import problem
from opsd.hint.build import build_example
from opsd.io.models import load
from opsd.render import message_text, prefill_length, render
from opsd.train import losses
from opsd.train import step as train_step
from opsd.train.losses import FullLogits
from opsd.train.records import TrainRecord
from opsd.types import Trajectory
from tests.conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "bfcl_rollouts.jsonl"


@pytest.fixture(scope="module")
def rollouts() -> list[Trajectory]:
    return [Trajectory.from_dict(json.loads(line)) for line in FIXTURE.open()]


@pytest.fixture(scope="module")
def pairs(rollouts):
    """(trajectory, one-error critique, all-errors critique) for every fixture reply."""
    one, every = make_critic("schema+reference"), make_critic("schema+reference", all_errors=True)
    return [(t, asyncio.run(one.critique(t)), asyncio.run(every.critique(t))) for t in rollouts]


def test_all_errors_critiques_are_valid_and_start_at_the_first_error(pairs):
    multi = 0
    for t, c1, c in pairs:
        assert problem(c, t) is None, (t.id, problem(c, t))
        assert (c.verdict, c.step, c.quote, c.quote_at, c.category) == (c1.verdict, c1.step, c1.quote, c1.quote_at,
                                                                        c1.category)
        if c.errors:
            multi += 1
            ats = [e["quote_at"] for e in c.errors]
            assert ats == sorted(ats) and len(c.errors) <= 3
            assert all(e["hint"].strip() in c.hint for e in c.errors)  # one part per error
    assert multi >= 50  # the fixture's replies mostly hold several errors (182 of 240 when written)
    assert make_critic("schema", all_errors=True).info != make_critic("schema").info  # cached critiques not reused


def test_validation_refuses_broken_error_lists(pairs):
    t, _, c = next(p for p in pairs if p[2].errors)
    swapped = dataclasses.replace(c, errors=[c.errors[0], *reversed(c.errors[1:])] if len(c.errors) > 2 else
                                  [c.errors[1], c.errors[0]])
    assert problem(swapped, t) is not None
    leaky = dataclasses.replace(c, hint=c.hint + " " + c.errors[1]["quote"].strip(" \"{}:,"))
    if c.errors[1]["quote"].strip(" \"{}:,"):
        assert "repeats" in problem(leaky, t)
    twice = dataclasses.replace(c, errors=[c.errors[0], c.errors[0]])  # the same tokens twice: overlapping
    assert "overlaps" in problem(twice, t)
    lone = dataclasses.replace(c, errors=c.errors[:1])
    assert problem(lone, t) is not None


def test_combine_drops_overlaps_and_hints_that_repeat_another_quote():
    e = lambda at, q, h, cat="x": {"quote": q, "quote_at": at, "category": cat, "hint": h}  # noqa: E731
    kept, hint = combine_errors([e(10, "bar", "Use baz."), e(0, "foo", "Use qux."), e(11, "ar", "Other.")])
    assert [k["quote"] for k in kept] == ["foo", "bar"] and hint == "Use qux. Use baz."
    kept, _ = combine_errors([e(0, "foo", "Not bar here."), e(10, "bar", "Use baz.")])
    assert [k["quote"] for k in kept] == ["foo"]  # the second quote would be repeated by the first hint
    assert len(combine_errors([e(i * 10, f"q{i}", f"H{i}.") for i in range(5)], max_errors=2)[0]) == 2


def _part(rec: TrainRecord, q0: int, q1: int) -> TrainRecord:
    """A one-error record: `rec` cut after the error at student positions [q0, q1), that error its span."""
    shift = rec.teacher_span[0] - rec.student_span[0]
    return TrainRecord(rec.id, rec.student_ids[:q1], (q0, q1), rec.teacher_ids[:q1 + shift], (q0 + shift, q1 + shift),
                       {k: v for k, v in rec.meta.items() if k != "quote_spans"})


def _logits(lm, batch) -> torch.Tensor:
    out = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    return out[batch.batch_idx, batch.pos].float()  # (N, V)


def _objective(lm, records: list[TrainRecord]) -> float:
    """The step objective with the hinted teacher's full logits (the same weights, hint in context)."""
    mb = train_step.make_micro_batch(records, 2)
    with torch.no_grad():
        s_NV, t_NV = _logits(lm, mb.student), _logits(lm, mb.teacher)
    div_N = losses.divergence(s_NV, FullLogits(t_NV), kind="jsd", beta=0.5)
    return train_step.objective(mb, div_N, losses.token_logprobs(s_NV, mb.student.targets), 1.0).item()


def test_masked_loss_equals_the_sum_of_one_error_records(pairs, smol_tok, tiny_dir):
    t, _, c = next(p for p in pairs if p[2].errors and len(p[2].errors) == 2)
    ex = build_example(t, c, smol_tok)
    (a0, a1), (b0, b1) = ex.meta["quote_spans"]
    assert ex.student_span == (a0, b1) and a1 < b0  # from the first error to the last, a gap between
    rec = TrainRecord.from_example(ex)
    assert rec.n_targets == (a1 - a0) + (b1 - b0) < b1 - a0
    mb = train_step.make_micro_batch([rec], 2)
    assert mb.span_tokens == rec.n_targets and mb.weight_N.tolist().count(0.0) == b0 - a1
    lm, _ = load(str(tiny_dir), precision="fp32")
    whole = _objective(lm, [rec])
    parts = _objective(lm, [_part(rec, a0, a1)]) + _objective(lm, [_part(rec, b0, b1)])
    assert whole == pytest.approx(parts, rel=1e-5)
    assert rec.with_reply([5, 6, 7]).target_mask is None  # a new reply: every token is a target again


@pytest.mark.parametrize("errors", [1, 2])
def test_anchor_weighs_the_error_tokens_1_and_the_rest_of_the_reply_the_anchor(pairs, smol_tok, tiny_dir, errors):
    """--anchor: the whole reply is the target (span=step); its loss is the error tokens' (what span=quote trains)
    plus `anchor` times the other tokens' (what span=step adds), and anchor 1 is span=step itself."""
    t, c1, c = next(p for p in pairs if p[2].errors and len(p[2].errors) == 2)
    crit = c if errors == 2 else c1
    quote = TrainRecord.from_example(build_example(t, crit, smol_tok))  # the error tokens only
    step_ex = build_example(t, crit, smol_tok, span="step")
    dense = TrainRecord.from_example(step_ex)
    assert dense.target_mask is None and dense.student_span[0] < quote.student_span[0]

    def anchored(a: float) -> TrainRecord:
        return TrainRecord.from_example(dataclasses.replace(step_ex, meta=step_ex.meta | {"anchor": a}))

    rec = anchored(0.25)
    w = rec.target_mask
    n_err = quote.n_targets
    s0, s1 = rec.student_span
    assert len(w) == s1 - s0 and w.count(1.0) == n_err and w.count(0.25) == s1 - s0 - n_err
    assert rec.n_targets == pytest.approx(n_err + 0.25 * (s1 - s0 - n_err))
    lm, _ = load(str(tiny_dir), precision="fp32")
    o25, o50, o100 = (_objective(lm, [anchored(a)]) for a in (0.25, 0.5, 1.0))
    assert o100 == pytest.approx(_objective(lm, [dense]), rel=1e-5)  # anchor 1 = span=step
    rest = (o100 - o50) / 0.5
    assert o50 - o25 == pytest.approx(0.25 * rest, rel=1e-4)  # linear in the anchor
    assert o50 - 0.5 * rest == pytest.approx(_objective(lm, [quote]), rel=1e-4)  # the error tokens weigh 1
    assert rec.with_reply([5, 6, 7]).target_mask is None  # a new reply: every token is a target again


def test_anchor_needs_the_error_span_and_a_hint_outside_the_reply():
    from opsd.train.config import TrainConfig

    TrainConfig(anchor=0.1)
    for bad in ({"anchor": 1.5}, {"anchor": -0.1}, {"anchor": 0.1, "span": "step"},
                {"anchor": 0.1, "placement": "inline"}):
        with pytest.raises(ValueError, match="anchor"):
            TrainConfig(**bad)


def test_random_span_matches_the_error_count_among_generated_tokens(pairs, smol_tok):
    moved = 0
    for t, c, _ in pairs[:60]:
        if c.verdict != "error":
            continue
        reply = t.messages[c.step]
        if reply["content"].startswith("<tool_call>\n"):  # as rollouts record it: the forced prefill
            t = Trajectory(t.id, [*t.messages[:c.step], {**reply, "prefill": "<tool_call>\n"}], t.tools, t.meta)
        q = build_example(t, c, smol_tok, span="quote")
        r = build_example(t, c, smol_tok, span="random")
        assert r.meta["quote_span"] == q.meta["quote_span"]  # the real error is still where it is
        (a, b), (qa, qb) = r.student_span, q.student_span
        rs = render(Trajectory(t.id, t.messages[:c.step + 1], t.tools), smol_tok)
        forced = prefill_length(t, c.step)
        assert forced == 12
        first = rs.quote_span(c.step, message_text(t.messages[c.step])[:forced], at=0)[1] if forced else 0
        assert first <= a < b <= rs.turn_end(c.step) and (b - a == qb - qa or b == rs.turn_end(c.step))
        assert r.student_ids == rs.input_ids[:b]
        assert build_example(t, c, smol_tok, span="random").student_span == (a, b)  # seeded by the trajectory
        moved += (a, b) != (qa, qb)
    assert moved >= 10  # not at the error, by design, in most replies


def test_random_span_control_keeps_what_the_error_span_keeps(tiny_dir, tmp_path):
    """The control trains on the same examples as OPSD (the hint-effect filter reads the real error), only its
    target tokens move."""
    from opsd.train import run as train
    from opsd.train.config import TrainConfig
    from tests.conftest import CRITIQUES, TRAJECTORIES

    kept = {}
    for span in ("quote", "random"):
        cfg = TrainConfig(model=str(tiny_dir), trajectories=str(TRAJECTORIES), critiques=str(CRITIQUES),
                          out=str(tmp_path / span), span=span, min_hint_effect=0.0, max_steps=1, batch_size=2,
                          progress=False, precision="fp32")
        train.main(cfg)
        rows = [json.loads(x) for x in (tmp_path / span / "examples.jsonl").read_text().splitlines()]
        kept[span] = [(r["meta"]["trajectory_id"], r["hint_effect"], r["student_span"]) for r in rows]
    assert 0 < len(kept["quote"]) == len(kept["random"])
    assert [k[:2] for k in kept["quote"]] == [k[:2] for k in kept["random"]]  # same examples, same measured effect
    assert any(q[2] != r[2] for q, r in zip(kept["quote"], kept["random"]))  # different target tokens
