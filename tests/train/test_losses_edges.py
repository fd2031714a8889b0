"""opsd.train.losses beyond the reference values: batched (B, T, V) inputs, the written-out gradient of
every kind, the log-ratio helper far from the mixture, defaults, the top-k fold's checks, and the small
helpers (entropy, token_logprobs, TopK.to, divergence dispatch). Found with `make mutation`."""
from __future__ import annotations

import math

import pytest
import torch

from opsd.train.losses import (
    TAIL_FLOOR,
    FullLogits,
    TopK,
    _log_ratio_to_mixture,
    divergence,
    divergence_from_logprobs,
    entropy,
    fold_topk,
    tail_from_topk,
    teacher_topk,
    token_divergence,
    token_divergence_topk,
    token_logprobs,
)
from tests.train.test_losses import logits, reference

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.8)]


@pytest.mark.parametrize("kind,beta", KINDS)
def test_batched_value_and_weighted_gradient_match_reference(kind, beta):
    """(B, T, V) logits and a per-position weight on the loss: value and gradient as float64 autograd gives them."""
    s = logits(2, 3, 11, seed=20).requires_grad_(True)
    t = logits(2, 3, 11, seed=21)
    w = torch.rand(2, 3, generator=torch.Generator().manual_seed(22)) + 0.5  # (B, T): grad_out is not all ones
    d = token_divergence(s, t, kind=kind, beta=beta)
    assert d.shape == (2, 3)
    (d * w).sum().backward()
    s64 = s.detach().double().requires_grad_(True)
    want = reference(s64, t, kind, beta)
    (want * w.double()).sum().backward()
    torch.testing.assert_close(d.detach().double(), want.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_batched_topk_matches_folded_reference(kind, beta):
    """Top-k targets on (B, T, V): both distributions folded onto k + 1 buckets by hand, value and gradient."""
    s = logits(2, 3, 13, seed=23).requires_grad_(True)
    t = logits(2, 3, 13, seed=24)
    k = 4
    ids, lps, tail = teacher_topk(t, k)
    assert ids.shape == lps.shape == (2, 3, k) and tail.shape == (2, 3)
    lp_t = torch.log_softmax(t.double(), -1)
    torch.testing.assert_close(lps.double(), lp_t.topk(k, -1).values, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tail.double(), lp_t.scatter(-1, ids, -math.inf).logsumexp(-1), atol=1e-6, rtol=1e-6)
    d = token_divergence_topk(s, TopK(ids, lps, tail), kind=kind, beta=beta)
    assert d.shape == (2, 3)
    d.sum().backward()
    s64 = s.detach().double().requires_grad_(True)
    q, p = torch.softmax(s64, -1), lp_t.exp()
    q_k1 = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
    p_k1 = torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)
    m = beta * p_k1 + (1 - beta) * q_k1
    want = {"forward_kl": kl(p_k1, q_k1), "reverse_kl": kl(q_k1, p_k1),
            "jsd": beta * kl(p_k1, m) + (1 - beta) * kl(q_k1, m)}[kind]
    want.sum().backward()
    torch.testing.assert_close(d.detach().double(), want.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-5, rtol=1e-4)


def test_log_ratio_to_mixture_near_and_far():
    """log(x/m), m = w·y + (1−w)·x, against float64 on both sides of the switch to the far form (d >= 80)."""
    l_self = torch.tensor([-0.5, -3.0, -150.0, -120.0, -2.0, -90.0, -1.0])
    l_other = torch.tensor([-0.5, -1.0, -1.0, -20.0, -140.0, -0.1, -1.0 + 79.0])
    for w in (0.1, 0.5, 0.9):
        got = _log_ratio_to_mixture(l_self, l_other, w)
        a, b = l_self.double(), l_other.double()
        want = a - torch.logaddexp(b + math.log(w), a + math.log(1 - w))
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
        assert got[0] == 0.0  # x == y: exactly 0


def test_tail_from_topk_batched_and_floored():
    """1 − Σ top-k per row of a (B, T, k) input; a top-k mass at or over 1 (rounding) gives the floor, never NaN."""
    lp = torch.log(torch.tensor([[[0.5, 0.25], [0.1, 0.1]], [[0.7, 0.7], [0.6, 0.4]]]))  # (2, 2, 2)
    got = tail_from_topk(lp)
    assert got.shape == (2, 2)
    torch.testing.assert_close(got[0], torch.log(torch.tensor([0.25, 0.8])))
    assert torch.equal(got[1], torch.full((2,), TAIL_FLOOR))


def test_topk_equal_to_vocab_without_a_stored_tail_has_no_tail_bucket():
    """k = V and no stored tail: the folded teacher has an empty tail (not the 2^-24 floor, which makes KL(P‖Q) inf)."""
    s, t = logits(2, 3, 9, seed=25), logits(2, 3, 9, seed=26)
    ids, lps, _ = teacher_topk(t, 9)
    for kind, beta in KINDS:
        got = token_divergence_topk(s, TopK(ids, lps, None), kind=kind, beta=beta)
        torch.testing.assert_close(got, token_divergence(s, t, kind=kind, beta=beta), atol=1e-5, rtol=1e-4)
    s_k1, t_k1 = fold_topk(torch.log_softmax(s, -1), TopK(ids, lps, None))
    assert s_k1.shape == t_k1.shape == (2, 3, 10)
    assert (t_k1[..., -1] == -math.inf).all() and (s_k1[..., -1] == -math.inf).all()


def test_fold_topk_shape_errors_name_the_shapes():
    lp = torch.log_softmax(logits(2, 10), -1)
    ids, lps, _ = teacher_topk(logits(3, 10), 4)
    with pytest.raises(ValueError, match=r"shapes do not match: log-probs \(2, 10\), ids \(3, 4\), teacher log-probs \(3, 4\)"):
        fold_topk(lp, TopK(ids, lps))
    ids2, lps2, _ = teacher_topk(logits(2, 10), 4)
    with pytest.raises(ValueError, match=r"ids \(2, 4\), teacher log-probs \(2, 3\)"):
        fold_topk(lp, TopK(ids2, lps2[:, :3]))


def test_defaults_are_jsd_at_half():
    s, t = logits(4, 12, seed=27), logits(4, 12, seed=28)
    jsd = token_divergence(s, t, kind="jsd", beta=0.5)
    torch.testing.assert_close(divergence_from_logprobs(torch.log_softmax(s, -1), torch.log_softmax(t, -1)), jsd)
    ids, lps, tail = teacher_topk(t, 12)
    torch.testing.assert_close(token_divergence_topk(s, TopK(ids, lps, tail)), jsd, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(divergence(s, FullLogits(t)), jsd)


def test_beta_out_of_range_is_rejected():
    s = logits(2, 4)
    for beta in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"beta must be in \[0, 1\], got {beta}"):
            token_divergence(s, s, beta=beta)


def test_divergence_dispatches_on_the_target_kind_and_passes_options():
    s, t = logits(5, 16, seed=29), logits(5, 16, seed=30)
    ids, lps, tail = teacher_topk(t, 6, temperature=0.7)
    for kind, beta in KINDS:
        opts = dict(kind=kind, beta=beta, temperature=0.7)
        assert torch.equal(divergence(s, FullLogits(t), **opts), token_divergence(s, t, **opts))
        assert torch.equal(divergence(s, TopK(ids, lps, tail), **opts), token_divergence_topk(s, TopK(ids, lps, tail), **opts))
    assert not torch.allclose(divergence(s, FullLogits(t), kind="reverse_kl"), divergence(s, FullLogits(t), kind="forward_kl"))


def test_entropy_with_zero_probabilities():
    """H = −Σ p log p on (B, T, V) log-probs; tokens of probability 0 (−inf) add exactly 0."""
    lp = torch.log_softmax(logits(2, 3, 7, seed=31), -1)
    p = lp.double().exp()
    torch.testing.assert_close(entropy(lp).double(), -(p * p.log()).sum(-1), atol=1e-6, rtol=1e-6)
    two = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(entropy(two), torch.tensor([math.log(2), 0.0]))


def test_token_logprobs_at_a_temperature():
    x = logits(2, 3, 8, seed=32)
    targets = torch.tensor([[0, 7, 3], [5, 5, 1]])
    got = token_logprobs(x, targets, temperature=0.5)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    want = torch.log_softmax(x.double() / 0.5, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(token_logprobs(x.half(), targets), torch.log_softmax(x.half().float(), -1).gather(
        -1, targets.unsqueeze(-1)).squeeze(-1))


def test_topk_to_moves_every_tensor_and_keeps_missing_ones_missing():
    ids, lps, tail = teacher_topk(logits(3, 10), 4)
    target = torch.tensor([-0.1, -2.0, -0.5])
    moved = TopK(ids, lps, tail, target).to("meta")
    for got, want in ((moved.ids_NK, ids), (moved.logprobs_NK, lps), (moved.tail_logprob_N, tail),
                      (moved.target_logprobs_N, target)):
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype
    bare = TopK(ids, lps).to("cpu")
    assert torch.equal(bare.ids_NK, ids) and torch.equal(bare.logprobs_NK, lps)
    assert bare.tail_logprob_N is None and bare.target_logprobs_N is None

