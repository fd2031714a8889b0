"""Per-token divergences between student and teacher next-token distributions (pure functions).

    from opsd.train.losses import token_divergence, token_divergence_topk, masked_mean
    d_N = token_divergence(student_logits_NV, teacher_logits_NV, kind="jsd", beta=0.5)   # (N,)
    loss = masked_mean(d_BT, mask_BT)                                                    # 0 on an empty mask

P is the teacher, Q the student (both softmax(logits / temperature)):
- `forward_kl` = KL(P‖Q) = Σ p (log p − log q)   (mode covering)
- `reverse_kl` = KL(Q‖P) = Σ q (log q − log p)   (mode seeking)
- `jsd`: GKD's generalised JSD with M = β·P + (1−β)·Q,
  JSD(β) = β·KL(P‖M) + (1−β)·KL(Q‖M). As in GKD/TRL, β=0 is taken to be exactly forward KL
  and β=1 exactly reverse KL (the mixture formula itself tends to 0 at both ends).

Terms with zero probability contribute 0 (0·log 0 = 0), with finite gradients.
The top-k form takes the teacher as (ids, log-probs) of its k most likely tokens. The rest of its
mass is kept as one tail bucket, and the student is folded onto the same k+1 buckets. With k = V
it equals the full form.
"""
from __future__ import annotations

import math

import torch

from opsd.types import DIVERGENCES as KINDS


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ p (log p − log q) over the last dim; entries with p = 0 contribute exactly 0."""
    live = logp != float("-inf")  # NaN stays live, so a broken model shows up as NaN, never as 0
    logp0 = logp.masked_fill(~live, 0.0)
    logq0 = logq.masked_fill(~live, 0.0)  # q only matters where p > 0
    return (logp0.exp() * (logp0 - logq0)).masked_fill(~live, 0.0).sum(-1)


def divergence_from_logprobs(student_lp: torch.Tensor, teacher_lp: torch.Tensor, *, kind: str = "jsd",
                             beta: float = 0.5) -> torch.Tensor:
    """Divergence over the last dim of two normalised log-prob tensors; returns shape `lp.shape[:-1]`."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(teacher_lp, student_lp)  # KL(P‖Q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(student_lp, teacher_lp)  # KL(Q‖P)
    if kind != "jsd":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    # log M = log(β·p + (1−β)·q), computed stably in log space
    log_m = torch.logaddexp(teacher_lp + math.log(beta), student_lp + math.log(1.0 - beta))
    return beta * _kl(teacher_lp, log_m) + (1.0 - beta) * _kl(student_lp, log_m)


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


def teacher_topk(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (ids, log-probs) of the teacher distribution at `temperature`: (..., V) -> (..., k), (..., k)."""
    lp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
    top_lp, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)  # (..., k)
    return top_ids, top_lp


def _tail(top_lp: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(top_lp)) over the last dim, keeping (...,); -inf when the top-k hold all the mass."""
    covered = torch.logsumexp(top_lp, dim=-1).clamp(max=0.0)  # (...,)
    return torch.log(-torch.expm1(covered))


def token_divergence_topk(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                          *, kind: str = "jsd", beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Divergence against a top-k teacher: logits (..., V), ids/log-probs (..., k) -> (...).

    `teacher_logprobs` must be normalised log-probs already at `temperature` (see `teacher_topk`).
    Both distributions become k+1 buckets: the teacher's k tokens, plus everything else.
    """
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"shapes do not match: logits {tuple(student_logits.shape)}, ids {tuple(teacher_ids.shape)}, "
                         f"logprobs {tuple(teacher_logprobs.shape)}")
    student_lp = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    s_top = student_lp.gather(-1, teacher_ids)  # (..., k)
    s_tail = student_lp.scatter(-1, teacher_ids, float("-inf")).logsumexp(-1)  # (...,) exact, no cancellation
    t_top = teacher_logprobs.float()
    s_k1 = torch.cat([s_top, s_tail.unsqueeze(-1)], dim=-1)  # (..., k+1)
    t_tail = _tail(t_top)  # (...,)
    if teacher_ids.shape[-1] >= student_logits.shape[-1]:  # k = V: no tail; ignore rounding residue
        t_tail = torch.full_like(t_tail, float("-inf"))
    t_k1 = torch.cat([t_top, t_tail.unsqueeze(-1)], dim=-1)  # (..., k+1)
    return divergence_from_logprobs(s_k1, t_k1, kind=kind, beta=beta)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ values where mask; NaN/inf outside the mask never leak in."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask`; exactly 0 (with zero gradient) when the mask is empty."""
    return masked_sum(values, mask) / mask.sum().clamp(min=1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target]: (..., V), (...) -> (...)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
