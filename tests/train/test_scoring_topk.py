"""`opsd.train.scoring.topk_with_tail`, the production top-k targets, against a float64 reference.

The reference sorts float64 log-probs and takes the first k as the top-k and the log-sum-exp of the rest as the
tail: it shares no code with the function (no `topk`, no `scatter`). Checked directly on random rows (hypothesis:
any k, ties, confident rows whose tail underflows a naive exp-sum-log in fp32), and through both callers:
`span_logprobs(top_k=...)` and `measure(lm, lm, top_k=...)` (the shared-prompt path), against the float64
log-softmax of the model's own full forward.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opsd.hint.build import build_examples
from opsd.hint.measure import measure
from opsd.train.scoring import span_logprobs, topk_with_tail
from tests.conftest import tiny_llama

# fp32 log-softmax against float64: |error| <= a few ulp of the largest |log-prob| (<= ~2000 in these rows)
RTOL, ATOL = 1e-5, 1e-5


def reference(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 top-k values (N, min(k, V)) in descending order and the log-mass outside them (N,), by sorting."""
    s = lp.double().sort(-1, descending=True).values  # (N, V)
    rest = s[:, k:]
    tail = rest.logsumexp(-1) if rest.shape[-1] else torch.full(s.shape[:1], float("-inf"), dtype=torch.float64)
    return s[:, :k], tail


def check(logits: torch.Tensor, k: int) -> None:
    """`topk_with_tail` of the fp32 log-softmax of `logits` (N, V) against the float64 log-softmax's reference."""
    lp = torch.log_softmax(logits.float(), -1)  # (N, V) as span_logprobs hands them over
    lp64 = torch.log_softmax(logits.double(), -1)  # (N, V)
    top, tail = topk_with_tail(lp, k)
    want_top, want_tail = reference(lp64, k)
    N, V = lp.shape
    kk = min(k, V)
    assert top.values.shape == top.indices.shape == (N, kk) and tail.shape == (N,)
    assert top.values.dtype == tail.dtype == torch.float32
    # the values are the log-probs at the indices, and the indices are distinct
    assert torch.equal(lp.gather(-1, top.indices), top.values)
    assert all(len(set(row)) == kk for row in top.indices.tolist())
    # the selection is a top-k of the float64 distribution (ties may go either way)
    chosen = torch.zeros(N, V, dtype=torch.bool).scatter(-1, top.indices, True)
    picked_min = lp64.masked_fill(~chosen, float("inf")).min(-1).values  # (N,)
    left_max = lp64.masked_fill(chosen, float("-inf")).max(-1).values  # (N,)
    assert (left_max <= picked_min + ATOL + RTOL * picked_min.abs()).all(), (picked_min, left_max)
    torch.testing.assert_close(top.values.double().sort(-1, descending=True).values, want_top, rtol=RTOL, atol=ATOL)
    # the tail: exactly -inf when the top-k hold the whole vocabulary, else the float64 log-mass outside them
    torch.testing.assert_close(tail.double(), want_tail, rtol=RTOL, atol=ATOL)
    if kk < V:
        assert torch.isfinite(tail).all()


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), v=st.integers(1, 40), extra_k=st.integers(-39, 3),
       scale=st.sampled_from([1e-3, 1.0, 4.0, 30.0, 300.0]), ties=st.booleans())
def test_topk_with_tail_matches_float64_reference(seed, n, v, extra_k, scale, ties):
    """Any k from 1 to V + 3 (k > V takes the whole vocabulary), flat to very confident rows, with and without ties."""
    k = max(1, v + extra_k)
    logits = torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale
    if ties:  # few distinct values: the top-k boundary often falls inside a tie
        logits = logits.round() if scale >= 1 else torch.zeros_like(logits)
    check(logits, k)


def test_confident_rows_keep_a_tail_below_fp32_exp_range():
    """A peak of +300 over the rest: the tail log-mass is about -300, whose exp is 0 in fp32 (exp(-104) is the
    smallest denormal). An exp-sum-log tail, or 1 - Σ top-k, would give -inf; the exact tail stays finite."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 50, generator=g)
    logits[:, :4] += torch.tensor([300.0, 290.0, 280.0, 270.0])  # four confident tokens, then a flat tail
    for k in (1, 4, 5, 49, 50):
        check(logits, k)
    _, tail = topk_with_tail(torch.log_softmax(logits, -1), 4)
    assert (tail < -250).all() and torch.isfinite(tail).all()  # (the case that separates a naive from an exact tail)


def test_a_known_row():
    """Hand-checked: probabilities (0.5, 0.25, 0.125, 0.125); top-2 = ids {0, 1}, tail = log 0.25."""
    lp = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    top, tail = topk_with_tail(lp, 2)
    assert top.indices.tolist() == [[0, 1]]
    torch.testing.assert_close(top.values, lp[:, :2])
    torch.testing.assert_close(tail, torch.tensor([0.25]).log())


def sharpened(model, factor: float):
    """The model with its (tied) output embeddings scaled: logits spread over ~10 nats, as a trained model's are,
    instead of a random init's near-uniform rows (where every tail is ~log(1 - k/V))."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def full_rows(model, ids_list, spans, temperature=1.0):
    """Per example: float64 log-softmax at `temperature` of the full forward's logits predicting the span tokens."""
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0, s - 1:e - 1].double() / temperature, -1)
                for ids, (s, e) in zip(ids_list, spans)]


def assert_targets(ids_K, values_K, tail, rows, k, tol=1e-4):
    """Top-k ids/values (L, k) and tail (L,) of the production path against float64 rows (L, V)."""
    want_top, want_tail = reference(rows, k)
    ids_K, values_K, tail = torch.as_tensor(ids_K), torch.as_tensor(values_K).double(), torch.as_tensor(tail).double()
    torch.testing.assert_close(values_K, rows.gather(-1, ids_K), rtol=tol, atol=tol)  # values belong to the ids
    torch.testing.assert_close(values_K, want_top, rtol=tol, atol=tol)  # and are the k largest
    torch.testing.assert_close(tail, want_tail, rtol=tol, atol=tol)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_span_logprobs_topk_matches_float64_full_forward(temperature):
    model = sharpened(tiny_llama(64, seed=8), 40.0)
    ids = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16], [20, 21, 22, 23, 24, 25]]
    spans = [(2, 8), (1, 4), (3, 6)]
    k = 8
    got = span_logprobs(model, ids, spans, top_k=k, batch_size=2, temperature=temperature, pad_id=2)
    for i, rows in enumerate(full_rows(model, ids, spans, temperature)):
        assert rows.exp().max() > 0.2  # sharp enough that the tail is not ~log(1 - k/V)
        assert_targets(got.topk_ids[i], got.topk_logprobs[i], got.topk_tail_logprobs[i], rows, k)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_measured_teacher_targets_match_float64_full_forward(smol_tok, trajectories, critiques, shared, temperature):
    """The targets OPSD trains on, from `measure`: the shared-prompt path (rows re-softmaxed at the temperature)
    and the two-pass path."""
    lm = sharpened(tiny_llama(len(smol_tok), seed=2), 40.0)
    exs, _ = build_examples(trajectories, critiques, smol_tok)
    exs = exs[:4]
    k = 16
    got = measure(lm, lm if shared else copy.deepcopy(lm), exs, batch_size=3, top_k=k, temperature=temperature,
                  pad_id=2)
    ref = full_rows(lm, [e.teacher_ids for e in exs], [e.teacher_span for e in exs], temperature)
    for m, rows in zip(got, ref):
        tk = m.teacher_topk
        assert_targets(tk.ids, tk.logprobs, tk.tail_logprobs, rows, k)
