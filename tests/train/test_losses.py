"""opsd.train.losses against a plain reference implementation, and the known properties."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opsd.train.losses import (
    masked_mean,
    teacher_topk,
    token_divergence,
    token_divergence_topk,
)


def reference(student_logits, teacher_logits, kind, beta, temperature=1.0):
    """Straight from the definitions, in float64 probabilities."""
    q = torch.softmax(student_logits.double() / temperature, -1)
    p = torch.softmax(teacher_logits.double() / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.1),
                                       ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_matches_reference(kind, beta, temperature):
    s, t = logits(3, 5, 50, seed=1), logits(3, 5, 50, seed=2)
    got = token_divergence(s, t, kind=kind, beta=beta, temperature=temperature)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got.double(), reference(s, t, kind, beta, temperature), atol=1e-5, rtol=1e-4)


def test_endpoints_are_exact_kls():
    s, t = logits(4, 30, seed=3), logits(4, 30, seed=4)
    assert torch.equal(token_divergence(s, t, kind="jsd", beta=0.0), token_divergence(s, t, kind="forward_kl"))
    assert torch.equal(token_divergence(s, t, kind="jsd", beta=1.0), token_divergence(s, t, kind="reverse_kl"))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.floats(0.0, 1.0), kind=st.sampled_from(["jsd", "forward_kl", "reverse_kl"]))
def test_properties(seed, beta, kind):
    s, t = logits(6, 17, seed=seed), logits(6, 17, seed=seed + 1)
    d = token_divergence(s, t, kind=kind, beta=beta)
    assert torch.all(d >= -1e-6) and torch.all(torch.isfinite(d))
    assert torch.allclose(token_divergence(s, s.clone(), kind=kind, beta=beta), torch.zeros(6), atol=1e-6)
    # a shift of the logits does not change the distributions
    torch.testing.assert_close(token_divergence(s + 5.0, t - 2.0, kind=kind, beta=beta), d, atol=1e-5, rtol=1e-4)
    if kind == "jsd" and 0 < beta < 1:  # bounded by the mixture entropy: JSD(β) <= H(β) <= log 2
        assert torch.all(d <= 0.6932)


def test_symmetry_at_half_and_swap_of_kls():
    s, t = logits(8, 40, seed=5), logits(8, 40, seed=6)
    torch.testing.assert_close(token_divergence(s, t, kind="jsd", beta=0.5), token_divergence(t, s, kind="jsd", beta=0.5))
    torch.testing.assert_close(token_divergence(s, t, kind="forward_kl"), token_divergence(t, s, kind="reverse_kl"))
    # the generalised JSD swaps β when student and teacher swap
    torch.testing.assert_close(token_divergence(s, t, kind="jsd", beta=0.2), token_divergence(t, s, kind="jsd", beta=0.8))


def test_gradients_match_reference():
    s = logits(5, 20, seed=7).requires_grad_(True)
    t = logits(5, 20, seed=8)
    token_divergence(s, t, kind="jsd", beta=0.3).sum().backward()
    s64 = s.detach().double().requires_grad_(True)
    reference(s64, t, "jsd", 0.3).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)])
def test_topk_with_full_vocab_equals_full(kind, beta):
    s, t = logits(4, 30, seed=9), logits(4, 30, seed=10)
    ids, lps = teacher_topk(t, 30, temperature=1.5)
    got = token_divergence_topk(s, ids, lps, kind=kind, beta=beta, temperature=1.5)
    torch.testing.assert_close(got, token_divergence(s, t, kind=kind, beta=beta, temperature=1.5), atol=1e-5, rtol=1e-4)


def test_topk_tail_bucket_reference():
    """k < V: both distributions folded onto k tokens + one tail bucket, compared by hand."""
    s, t = logits(3, 25, seed=11), logits(3, 25, seed=12)
    k = 5
    ids, lps = teacher_topk(t, k)
    p = torch.softmax(t.double(), -1)
    q = torch.softmax(s.double(), -1)
    p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
    p_k1 = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_k1 = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    m = 0.5 * p_k1 + 0.5 * q_k1
    want = 0.5 * (p_k1 * (p_k1 / m).log()).sum(-1) + 0.5 * (q_k1 * (q_k1 / m).log()).sum(-1)
    got = token_divergence_topk(s, ids, lps, kind="jsd", beta=0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    s.requires_grad_(True)
    token_divergence_topk(s, ids, lps, kind="reverse_kl").sum().backward()
    assert torch.isfinite(s.grad).all()


def test_masked_mean_empty_is_zero_not_nan():
    v = torch.tensor([[float("nan"), 1.0], [2.0, float("inf")]], requires_grad=True)
    empty = torch.zeros(2, 2, dtype=torch.bool)
    out = masked_mean(v, empty)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(v.grad, torch.zeros(2, 2))
    mask = torch.tensor([[False, True], [True, False]])
    assert masked_mean(v, mask).item() == pytest.approx(1.5)


def test_bad_arguments():
    s = logits(2, 4)
    with pytest.raises(ValueError, match="kind"):
        token_divergence(s, s, kind="tvd")
    with pytest.raises(ValueError, match="shapes"):
        token_divergence(s, logits(2, 5))
    with pytest.raises(ValueError, match="temperature"):
        token_divergence(s, s, temperature=0)


def test_nan_logits_propagate():
    """A broken model must surface as NaN (the loop then stops), never be masked to 0."""
    s, t = logits(2, 10, seed=13), logits(2, 10, seed=14)
    s[0, 3] = float("nan")
    for kind in ("jsd", "forward_kl", "reverse_kl"):
        d = token_divergence(s, t, kind=kind)
        assert torch.isnan(d[0]) and torch.isfinite(d[1])
