"""opsd.train.losses against a plain reference implementation, and the known properties."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opsd.train.losses import (
    TopK,
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
    ids, lps, tail = teacher_topk(t, 30, temperature=1.5)
    got = token_divergence_topk(s, TopK(ids, lps, tail), kind=kind, beta=beta, temperature=1.5)
    torch.testing.assert_close(got, token_divergence(s, t, kind=kind, beta=beta, temperature=1.5), atol=1e-5, rtol=1e-4)


def test_topk_tail_bucket_reference():
    """k < V: both distributions folded onto k tokens + one tail bucket, compared by hand."""
    s, t = logits(3, 25, seed=11), logits(3, 25, seed=12)
    k = 5
    ids, lps, tail = teacher_topk(t, k)
    p = torch.softmax(t.double(), -1)
    q = torch.softmax(s.double(), -1)
    p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
    p_k1 = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_k1 = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    m = 0.5 * p_k1 + 0.5 * q_k1
    want = 0.5 * (p_k1 * (p_k1 / m).log()).sum(-1) + 0.5 * (q_k1 * (q_k1 / m).log()).sum(-1)
    for stored_tail in (tail, None):  # the exact tail, or 1 - sum of the top-k (representable here)
        got = token_divergence_topk(s, TopK(ids, lps, stored_tail), kind="jsd", beta=0.5)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    s.requires_grad_(True)
    token_divergence_topk(s, TopK(ids, lps, tail), kind="reverse_kl").sum().backward()
    assert torch.isfinite(s.grad).all()


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


# ---------------------------------------------------------------- confident teachers, identical teachers

V_REAL, K_REAL = 49152, 256  # SmolLM2's vocabulary, opsd's default top-k


def peaked_teacher(n: int, *, peak: float, seed: int) -> torch.Tensor:
    """Teacher logits as a trained LM gives them on a tool call: a N(0, 2) background and one token at +`peak`."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, V_REAL, generator=g) * 2
    t[torch.arange(n), torch.randint(0, V_REAL, (n,), generator=g)] = peak
    return t


def student_near(t: torch.Tensor, *, seed: int, noise: float) -> torch.Tensor:
    """A student that agrees with the teacher up to noise, and one that is spread out (early in training)."""
    g = torch.Generator().manual_seed(seed)
    return t + noise * torch.randn(t.shape, generator=g)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 1.0), ("jsd", 0.9), ("forward_kl", 0.5)])
def test_topk_loss_stays_finite_for_a_confident_teacher(kind, beta):
    """Peak +30 at V=49152: the top-256 mass rounds to 1 in fp32, so 1 - sum(top-k) is 0 and log(tail) = -inf.

    The reverse KL against that tail was inf (the full value is ~19 for a spread-out student) and its gradient
    NaN. With the exact tail (stored with the targets) the top-k value is a close lower bound of the full one;
    with only the top-k log-probs the tail is floored at 2^-24: still finite, still a lower bound.
    """
    t = peaked_teacher(6, peak=30.0, seed=1)
    for s in (student_near(t, seed=2, noise=1.0), torch.randn(6, V_REAL, generator=torch.Generator().manual_seed(3))):
        full = token_divergence(s, t, kind=kind, beta=beta)
        ids, lps, tail = teacher_topk(t, K_REAL)
        assert (torch.logsumexp(lps, -1) == 0).all()  # the case of the bug: the top-k hold all the mass in fp32
        for stored_tail in (tail, None):
            s_ = s.clone().requires_grad_(True)
            got = token_divergence_topk(s_, TopK(ids, lps, stored_tail), kind=kind, beta=beta)
            got.sum().backward()
            assert torch.isfinite(got).all() and torch.isfinite(s_.grad).all(), (stored_tail is None, got)
            assert (got <= full + 1e-3 * full.abs() + 1e-4).all()  # folding onto k+1 buckets only loses information
    # a spread-out student, reverse KL (measured): full 19.69, exact tail 17.49, floored tail 16.62, before: inf
    s = torch.randn(6, V_REAL, generator=torch.Generator().manual_seed(3))
    full = token_divergence(s, t, kind=kind, beta=beta)
    exact = token_divergence_topk(s, TopK(ids, lps, tail), kind=kind, beta=beta)
    floored = token_divergence_topk(s, TopK(ids, lps, None), kind=kind, beta=beta)
    if kind in ("reverse_kl", "jsd") and beta in (0.5, 1.0):  # the reverse KL: a tail floored higher costs less
        assert (full > 19).all() and (exact > 0.85 * full).all() and (floored <= exact + 1e-4).all()


def test_topk_tail_from_logprobs_is_exact_where_representable():
    """A teacher whose tail fp32 resolves (peak +8): 1 - sum(top-k) equals the exact tail, and so do the losses."""
    t = peaked_teacher(6, peak=8.0, seed=4)
    s = student_near(t, seed=5, noise=1.0)
    ids, lps, tail = teacher_topk(t, K_REAL)
    assert (tail > -10).all()  # a tail of more than 4.5e-5: well above fp32 resolution
    for kind in ("reverse_kl", "jsd", "forward_kl"):
        with_tail = token_divergence_topk(s, TopK(ids, lps, tail), kind=kind)
        from_lps = token_divergence_topk(s, TopK(ids, lps, None), kind=kind)
        torch.testing.assert_close(from_lps, with_tail, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
def test_identical_teacher_gives_exactly_zero_loss_and_gradient(kind, beta):
    """A teacher equal to the student bit for bit: value and gradient exactly 0, for full and top-k targets.

    Autograd through the formulas leaves ~1e-8 of rounding noise in the gradient, which Adam (update ~ g/|g|)
    turns into a full-size step; the written-out gradient has none.
    """
    t = peaked_teacher(4, peak=12.0, seed=6)
    s = t.clone().requires_grad_(True)
    token_divergence(s, t, kind=kind, beta=beta).sum().backward()
    assert torch.count_nonzero(s.grad) == 0
    ids, lps, tail = teacher_topk(t, K_REAL)
    s.grad = None
    d = token_divergence_topk(s, TopK(ids, lps, tail), kind=kind, beta=beta)
    d.sum().backward()
    assert (d.abs() < 1e-6).all() and torch.count_nonzero(s.grad) == 0
