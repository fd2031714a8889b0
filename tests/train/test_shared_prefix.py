"""Grouped scoring with the shared prompt run once equals scoring each whole sequence on its own."""
from __future__ import annotations

import pytest
import torch

from opsd.hint.build import build_examples
from opsd.train.scoring import span_logprobs
from opsd.train.shared_prefix import Member, common_prefix, grouped_span_scores, shared_length
from tests.conftest import tiny_llama


def _groups(smol_tok, trajectories, critiques):
    """Per example: its student sequence (rows), its hinted sequence (token log-probs), and a copy of the student
    sequence cut short (a member whose span ends early); plus one group with no shared prefix at all."""
    exs, _ = build_examples(trajectories, critiques, smol_tok)
    groups = []
    for e in exs:
        s0 = e.student_span[0]
        groups.append([Member(e.student_ids, tuple(e.student_span), rows=True),
                       Member(e.teacher_ids, tuple(e.teacher_span)),
                       Member(e.student_ids[:s0 + 1], (s0, s0 + 1))])
    a, b = exs[0], exs[1]
    groups.insert(1, [Member(b.student_ids[5:], (b.student_span[0] - 5, b.student_span[1] - 5)),
                      Member(a.student_ids, tuple(a.student_span), rows=True)])
    return groups


@pytest.mark.parametrize("batch_size", [1, 3])
def test_grouped_scores_equal_whole_sequence_scoring(smol_tok, trajectories, critiques, batch_size):
    model = tiny_llama(len(smol_tok), seed=4)
    groups = _groups(smol_tok, trajectories, critiques)
    assert shared_length(groups[1]) == 0 and all(shared_length(g) > 20 for g in groups[2:])
    got = list(grouped_span_scores(model, groups, batch_size=batch_size, pad_id=2))
    assert len(got) == len(groups)
    for g, scores in zip(groups, got):
        assert len(scores) == len(g)
        for m, x in zip(g, scores):
            ref = span_logprobs(model, [m.ids], [m.span], return_rows=m.rows)
            want = ref.rows[0] if m.rows else ref.token_logprobs[0]
            assert x.shape == want.shape
            torch.testing.assert_close(x, want, atol=1e-5, rtol=1e-5)


def test_shared_length_stops_before_the_first_target():
    a = Member([1, 2, 3, 4, 5, 6], (4, 6))
    assert shared_length([a, Member([1, 2, 3, 4, 9], (3, 5))]) == 2  # earliest span start 3 -> 2 shared tokens
    assert shared_length([a, Member([1, 2, 7, 4, 5, 6], (5, 6))]) == 2  # they differ at index 2
    assert shared_length([a]) == 3
    with pytest.raises(ValueError, match="span"):
        shared_length([Member([1, 2], (0, 1))])


def test_grouped_scores_reject_bad_input(smol_tok):
    model = tiny_llama(len(smol_tok))
    with pytest.raises(ValueError, match="no members"):
        list(grouped_span_scores(model, [[]]))
    with pytest.raises(ValueError, match="batch_size"):
        list(grouped_span_scores(model, [[Member([1, 2, 3], (1, 3))]], batch_size=0))


def test_edges_of_the_shared_length_and_the_common_prefix():
    assert shared_length([Member([1, 2, 3], (1, 3))]) == 0  # a span may start at token 1: nothing is shared
    with pytest.raises(ValueError, match="span"):
        shared_length([Member([1, 2, 3], (2, 2))])  # an empty span
    assert common_prefix([1, 2], [1, 2, 3], 10) == 2 and common_prefix([1, 2, 3], [1, 2], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3], 2) == 2 and common_prefix([1, 2, 3], [1, 2, 3], 10) == 3
    assert common_prefix([5], [6], 3) == 0 and common_prefix([5, 2], [6, 2], 3) == 0
    assert shared_length([Member([1, 2, 3], (2, 3)), Member([9, 2, 3], (2, 3))]) == 0  # they differ at token 0


def test_grouped_scores_at_a_temperature(smol_tok, trajectories, critiques):
    model = tiny_llama(len(smol_tok), seed=5)
    groups = _groups(smol_tok, trajectories, critiques)[:3]
    for g, scores in zip(groups, grouped_span_scores(model, groups, batch_size=2, pad_id=2, temperature=2.0)):
        for m, x in zip(g, scores):
            ref = span_logprobs(model, [m.ids], [m.span], return_rows=m.rows, temperature=2.0)
            torch.testing.assert_close(x, ref.rows[0] if m.rows else ref.token_logprobs[0], atol=1e-5, rtol=1e-5)
