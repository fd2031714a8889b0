"""Grouped scoring with the shared prompt run once equals scoring each whole sequence on its own, in fp32 and
under bf16 autocast (as opsd runs bf16: fp32 weights, `torch.autocast` bf16 around the forward, the head in fp32)."""
from __future__ import annotations

import pytest
import torch

from opsd.hint.build import build_examples
from opsd.train.scoring import span_logprobs
from opsd.train.shared_prefix import Member, common_prefix, grouped_span_scores, shared_length
from tests.conftest import tiny_llama

# bf16: the grouped and the whole-sequence forwards run matmuls of other shapes, so a bf16 rounding of theirs may
# fall the other way; the results agree to bf16's rounding, not to 1e-5. Measured (2026-12-07, this test's groups,
# `sharp_llama` seeds 0-7, batch_size 1 and 3, on an AVX512-BF16 CPU), |grouped - whole| of the log-probs:
#   fp32: max <= 3.8e-6;  bf16: max 1.4e-4..3.8e-4, mean over all scores 1.8e-7..1.5e-5 (seed 4, batch 3: 8.3e-6)
#   bf16 vs fp32 of the whole-sequence scores themselves: max 4.9e-4..7.6e-4, mean 6.1e-5..8.8e-5
# So BF16_MAX = 2e-3 (5x the largest grouped-vs-whole bf16 difference, 2.6x bf16's own largest change) and
# BF16_MEAN = 3e-5 (2x the largest mean difference; half of the smallest mean change bf16 itself makes, so a
# forward of which one part runs outside autocast fails it: prefix in fp32 measured 6.2e-5..7.2e-5 mean, a position
# off by one 6.3e-4 mean / 6.5e-3 max).
BF16_MAX, BF16_MEAN = 2e-3, 3e-5


def sharp_llama(vocab_size: int, seed: int, factor: float = 6.0):
    """A tiny Llama whose attention is not near-uniform (q/k projections scaled): a random init attends almost
    evenly, so a position off by one moves its log-probs by ~1.4e-4, below bf16's rounding (measured); here by
    ~6e-3, as a trained model's would move."""
    model = tiny_llama(vocab_size, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_grouped_scores_equal_whole_sequence_scoring(smol_tok, trajectories, critiques, batch_size, precision):
    model = sharp_llama(len(smol_tok), seed=4)
    groups = _groups(smol_tok, trajectories, critiques)
    assert shared_length(groups[1]) == 0 and all(shared_length(g) > 20 for g in groups[2:])
    bf16 = precision == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got = list(grouped_span_scores(model, groups, batch_size=batch_size, pad_id=2))
    assert len(got) == len(groups)
    diffs, bf16_moves = [], []
    for g, scores in zip(groups, got):
        assert len(scores) == len(g)
        for m, x in zip(g, scores):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                ref = span_logprobs(model, [m.ids], [m.span], return_rows=m.rows)
            want = ref.rows[0] if m.rows else ref.token_logprobs[0]
            assert x.shape == want.shape and x.dtype == want.dtype == torch.float32
            if not bf16:
                torch.testing.assert_close(x, want, atol=1e-5, rtol=1e-5)
                continue
            diffs.append((x - want).abs().flatten())
            ref32 = span_logprobs(model, [m.ids], [m.span], return_rows=m.rows)
            bf16_moves.append((want - (ref32.rows[0] if m.rows else ref32.token_logprobs[0])).abs().flatten())
    if bf16:
        d, moved = torch.cat(diffs), torch.cat(bf16_moves)
        assert moved.mean() > 2 * BF16_MEAN  # bf16 really ran (its own change is larger than the tolerance)
        assert d.max() <= BF16_MAX and d.mean() <= BF16_MEAN, (d.max().item(), d.mean().item())


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
