"""Per-token divergences between student and teacher next-token distributions (pure functions).

    from opsd.train.losses import FullLogits, TopK, divergence, token_divergence
    d_N = token_divergence(student_logits_NV, teacher_logits_NV, kind="jsd", beta=0.5)     # (N,)
    d_N = divergence(student_logits_NV, FullLogits(teacher_logits_NV) or TopK(...), kind=..)  # either target
    # opsd.train.step sums d_N over the tokens that carry loss (TrainRecord.target_mask, weighted per record)

P is the teacher, Q the student (both softmax(logits / temperature)):
- `forward_kl` = KL(P‖Q) = Σ p (log p − log q)   (mode covering)
- `reverse_kl` = KL(Q‖P) = Σ q (log q − log p)   (mode seeking)
- `jsd`: GKD's generalised JSD with M = β·P + (1−β)·Q,
  JSD(β) = β·KL(P‖M) + (1−β)·KL(Q‖M). As in GKD/TRL, β=0 is taken to be exactly forward KL
  and β=1 exactly reverse KL (the mixture formula itself tends to 0 at both ends).

Everything runs in fp32 (inputs are cast), whatever precision the logits came in.
Terms with zero probability contribute 0 (0·log 0 = 0); NaN always propagates.

The gradient is written out (`_Divergence`), not left to autograd: with δ = log q − log p,
∂KL(Q‖P)/∂z = q ⊙ (δ − E_q δ), ∂KL(P‖Q)/∂z = q − p and ∂JSD/∂z = (1−β) q ⊙ (ℓ − E_q ℓ),
ℓ = log(q/m) = −log1p(β·expm1(log p − log q)). Each is exactly 0 where the student equals the
teacher bit for bit, so an identical teacher gives no update at all (autograd through the
formulas leaves rounding noise of ~1e-8 that Adam would blow up into a full-size step).

Targets (`Targets = FullLogits | TopK`): the teacher's full logits at the target positions, or
its top-k (ids, log-probs) precomputed before training. Top-k folds both distributions onto k+1
buckets (the k tokens and one tail). The teacher's tail log-mass is exact when it was stored with
the targets (`teacher_topk` computes it from the full row: no cancellation, however confident
the teacher); otherwise it is 1 − Σ top-k, floored at fp32 resolution (2^-24) so that a teacher
whose top-k mass rounds to 1 still gives a finite reverse KL. With k = V it equals the full form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opsd.types import DIVERGENCES as KINDS

TAIL_FLOOR = -24 * math.log(2)  # log 2^-24: the smallest tail 1 − Σ top-k that fp32 resolves next to 1
_NEAR = 80.0  # |log p − log q| below which the log1p/expm1 form of log(q/m) is used (expm1 stays finite)


@dataclass
class FullLogits:
    """The teacher's logits at the target positions."""

    logits_NV: torch.Tensor  # (N, V)


@dataclass
class TopK:
    """The teacher known on its k most likely tokens (precomputed before training)."""

    ids_NK: torch.Tensor  # (N, k) token ids
    logprobs_NK: torch.Tensor  # (N, k) normalised log-probs at the training temperature
    tail_logprob_N: torch.Tensor | None = None  # (N,) exact log-mass outside the k tokens; None: 1 − Σ top-k, floored
    target_logprobs_N: torch.Tensor | None = None  # (N,) the teacher's log-prob of each actual target token (T = 1)

    def to(self, device) -> TopK:
        opt = lambda t: None if t is None else t.to(device)
        return TopK(self.ids_NK.to(device), self.logprobs_NK.to(device), opt(self.tail_logprob_N),
                    opt(self.target_logprobs_N))


Targets = FullLogits | TopK


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ p (log p − log q) over the last dim of log-probs; entries with p = 0 contribute exactly 0."""
    live = logp != float("-inf")  # NaN stays live, so a broken model shows up as NaN, never as 0
    logp0 = logp.masked_fill(~live, 0.0)
    logq0 = logq.masked_fill(~live, 0.0)  # q only matters where p > 0
    return (logp0.exp() * (logp0 - logq0)).masked_fill(~live, 0.0).sum(-1)


def entropy(lp: torch.Tensor) -> torch.Tensor:
    """H = −Σ p log p over the last dim of log-probs (0·log 0 = 0): (..., V) -> (...)."""
    return -(lp.exp() * lp.masked_fill(lp == float("-inf"), 0.0)).sum(-1)


def _log_ratio_to_mixture(l_self: torch.Tensor, l_other: torch.Tensor, w_other: float) -> torch.Tensor:
    """log(x / m) with m = w·y + (1−w)·x, from log x and log y; exactly 0 where x == y."""
    d = l_other - l_self
    near = -torch.log1p(w_other * torch.expm1(d.clamp(max=_NEAR)))  # exact 0 at d = 0
    log_w, log_1mw = (math.log(w) if w > 0 else -math.inf for w in (w_other, 1.0 - w_other))
    far = l_self - torch.logaddexp(l_other + log_w, l_self + log_1mw)
    return torch.where(d < _NEAR, near, far)


def _value_and_grad(student_lp: torch.Tensor, teacher_lp: torch.Tensor, kind: str, beta: float, need_grad: bool):
    """(divergence (...), its gradient w.r.t. the student's log-probs on the simplex (..., V) or None)."""
    q_live = student_lp != float("-inf")
    q = student_lp.exp()  # (..., V)
    if kind == "forward_kl":  # KL(P‖Q)
        return kl(teacher_lp, student_lp), (q - teacher_lp.exp()) if need_grad else None
    if kind == "reverse_kl":  # KL(Q‖P); ∂/∂z = q ⊙ (δ − E_q δ)
        delta = (student_lp - teacher_lp).masked_fill(~q_live, 0.0)  # (..., V)
        value = kl(student_lp, teacher_lp)
        if not need_grad:
            return value, None
        return value, q * (delta - (q * delta).sum(-1, keepdim=True))
    # generalised JSD, 0 < β < 1
    p_live = teacher_lp != float("-inf")
    ell_q = _log_ratio_to_mixture(student_lp, teacher_lp, beta).masked_fill(~q_live, 0.0)  # log(q/m)
    ell_p = _log_ratio_to_mixture(teacher_lp, student_lp, 1.0 - beta).masked_fill(~p_live, 0.0)  # log(p/m)
    value = beta * (teacher_lp.exp() * ell_p).sum(-1) + (1.0 - beta) * (q * ell_q).sum(-1)
    if not need_grad:
        return value, None
    return value, (1.0 - beta) * q * (ell_q - (q * ell_q).sum(-1, keepdim=True))


class _Divergence(torch.autograd.Function):
    """Divergence with the analytic gradient (see module docstring); the teacher side gets none."""

    @staticmethod
    def forward(ctx, student_lp, teacher_lp, kind: str, beta: float):
        value, grad = _value_and_grad(student_lp, teacher_lp, kind, beta, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad if grad is not None else student_lp.new_empty(0))
        return value

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out.unsqueeze(-1) * grad, None, None, None


def _canonical(kind: str, beta: float) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def divergence_from_logprobs(student_lp: torch.Tensor, teacher_lp: torch.Tensor, *, kind: str = "jsd",
                             beta: float = 0.5) -> torch.Tensor:
    """Divergence over the last dim of two normalised log-prob tensors; returns shape `lp.shape[:-1]`.

    The student side's gradient is the one on the probability simplex: it is exact once the
    log-probs come from a log-softmax (or a fold of one), as everywhere in opsd.
    """
    kind = _canonical(kind, beta)
    return _Divergence.apply(student_lp.float(), teacher_lp.float().detach(), kind, float(beta))


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "jsd",
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence of full-vocab logits (..., V) -> (...). Computed in fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student_lp = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    teacher_lp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
    return divergence_from_logprobs(student_lp, teacher_lp, kind=kind, beta=beta)


def teacher_topk(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0):
    """Top-k of the teacher at `temperature`: ids (..., k), log-probs (..., k) and the exact tail log-mass (...)."""
    lp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
    top_lp, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)  # (..., k)
    tail = lp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # (...,) no cancellation
    return top_ids, top_lp, tail


def tail_from_topk(top_lp: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(top_lp)) over the last dim, floored at `TAIL_FLOOR` (a tail fp32 cannot resolve)."""
    covered = torch.logsumexp(top_lp.float(), dim=-1).clamp(max=0.0)  # (...,)
    return torch.log(-torch.expm1(covered)).clamp(min=TAIL_FLOOR)


def fold_topk(student_lp: torch.Tensor, targets: TopK) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs (..., V) and a top-k teacher folded onto the same k+1 buckets: two (..., k+1)."""
    ids, t_top = targets.ids_NK, targets.logprobs_NK.float()
    if ids.shape != t_top.shape or ids.shape[:-1] != student_lp.shape[:-1]:
        raise ValueError(f"shapes do not match: log-probs {tuple(student_lp.shape)}, ids {tuple(ids.shape)}, "
                         f"teacher log-probs {tuple(t_top.shape)}")
    s_top = student_lp.gather(-1, ids)  # (..., k)
    s_tail = student_lp.scatter(-1, ids, float("-inf")).logsumexp(-1)  # (...,) exact, no cancellation
    if ids.shape[-1] >= student_lp.shape[-1]:  # k = V: no tail; ignore rounding residue
        t_tail = torch.full_like(s_tail, float("-inf"))
    elif targets.tail_logprob_N is not None:
        t_tail = targets.tail_logprob_N.float()
    else:
        t_tail = tail_from_topk(t_top)
    return torch.cat([s_top, s_tail.unsqueeze(-1)], -1), torch.cat([t_top, t_tail.unsqueeze(-1)], -1)


def token_divergence_topk(student_logits: torch.Tensor, targets: TopK, *, kind: str = "jsd", beta: float = 0.5,
                          temperature: float = 1.0) -> torch.Tensor:
    """Divergence against a top-k teacher: logits (..., V) -> (...). `targets` log-probs are at `temperature`."""
    student_lp = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    s_k1, t_k1 = fold_topk(student_lp, targets)
    return divergence_from_logprobs(s_k1, t_k1, kind=kind, beta=beta)


def divergence(student_logits: torch.Tensor, targets: Targets, *, kind: str = "jsd", beta: float = 0.5,
               temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence (N,) of student logits (N, V) from either kind of teacher target."""
    if isinstance(targets, TopK):
        return token_divergence_topk(student_logits, targets, kind=kind, beta=beta, temperature=temperature)
    return token_divergence(student_logits, targets.logits_NV, kind=kind, beta=beta, temperature=temperature)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target]: (..., V), (...) -> (...), in fp32."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
