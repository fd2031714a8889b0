"""Span-only scoring: next-token logits, log-probs and top-k only at the positions you ask for.

A causal LM's position p predicts token p+1, so the logits for target tokens [s, e) come from
hidden states at positions [s-1, e-1). Everything here runs the base decoder for hidden states,
gathers those positions, and applies `lm_head` (and log-softmax) only there: the full
(B, T, V) logits are never built.

API (used by `opsd.train` and, for `opsd eval`, by the evaluation stage):

    from opsd.train.scoring import span_logprobs, span_logits, SpanLM
    s = span_logprobs(model, ids_list, spans, batch_size=8, top_k=16, return_rows=False)
    s.token_logprobs[i]   # (L_i,) float32 log-prob of the actual token ids_list[i][p], p in spans[i]
    s.topk_ids[i]         # (L_i, k) top-k ids of the distribution predicting each span token (top_k > 0)
    s.topk_logprobs[i]    # (L_i, k) their log-probs
    s.topk_tail_logprobs[i]  # (L_i,) exact log-mass outside the top-k (top-k distillation targets)
    s.rows[i]             # (L_i, V) full log-prob rows (return_rows=True; memory: L_i * V floats)

- `model` is any HF causal LM (or a peft model, or `SpanLM`); `ids_list` are token-id lists,
  `spans` half-open [start, end) token ranges with start >= 1.
- `padding="right"` or `"left"`: results are identical (position ids come from the attention
  mask), which the tests check.
- Runs under `torch.no_grad()` in the model's current mode, at `temperature` (default 1).
- `span_logits(lm, input_ids_BT, attention_mask_BT, batch_idx_N, pos_N)` is the differentiable
  core: the logits (N, V) predicted at positions `pos_N` of rows `batch_idx_N`.
- `SpanLM(lm)` wraps that core as an `nn.Module`, so that `accelerate.prepare` (DDP/FSDP) can
  wrap it and gradients sync through its `forward`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode for the block; its train/eval mode is restored afterwards, even on error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _causal_lm(model):
    """The HF causal LM inside `model` (unwraps SpanLM, DDP and peft)."""
    while True:
        if isinstance(model, SpanLM):
            model = model.lm
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft: LoRA layers are injected into the base model
            model = model.get_base_model()
        else:
            return model


def span_logits(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_idx: torch.Tensor,
                pos: torch.Tensor, cache=None) -> torch.Tensor:
    """Logits (N, V) predicted at positions `pos` (N,) of rows `batch_idx` (N,): lm_head only there.
    With `cache` (an empty transformers DynamicCache) the forward also leaves its keys/values there."""
    causal = _causal_lm(lm)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T); right or left padding
    hidden_BTD = causal.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      past_key_values=cache, use_cache=cache is not None).last_hidden_state
    return head_logits(causal, hidden_BTD[batch_idx, pos])


def head_logits(causal, hidden_ND: torch.Tensor) -> torch.Tensor:
    """The LM head (N, V) of a causal LM applied to hidden states (N, D), as the model's own forward does."""
    head = causal.get_output_embeddings()
    # the head runs in its weights' precision, outside any bf16 autocast: the student's fp32 master weights give
    # fp32 logits (bf16 logits carry ~0.4% rounding per logit, more than a near-converged divergence's gradient:
    # under bf16 autocast GKD on the real model *raised* the divergence, BENCHMARKS.md numerics)
    with torch.autocast(device_type=hidden_ND.device.type, enabled=False):
        logits_NV = head(hidden_ND.to(head.weight.dtype))  # (N, V)
    cap = getattr(causal.config, "final_logit_softcapping", None)
    if cap:  # Gemma-2 style soft-capping, as in the model's own forward
        logits_NV = torch.tanh(logits_NV / cap) * cap
    return logits_NV


class SpanLM(nn.Module):
    """`forward(input_ids, attention_mask, batch_idx, pos) -> logits (N, V)` at the given positions only."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, batch_idx, pos, cache=None):
        return span_logits(self.lm, input_ids, attention_mask, batch_idx, pos, cache)


@dataclass
class SpanBatch:
    """Padded ids plus the flat (row, position) pairs that predict each target token."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    batch_idx: torch.Tensor  # (N,) row of each target token
    pos: torch.Tensor  # (N,) position whose output predicts it (target index - 1)
    targets: torch.Tensor  # (N,) the target token ids
    lengths: list[int] = field(default_factory=list)  # span length per row, to split (N,) back


def collate(ids_list: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], *, pad_id: int = 0,
            padding: str = "right") -> SpanBatch:
    """Pad `ids_list` and list the prediction positions of every span token (rows in order)."""
    if padding not in ("right", "left"):
        raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
    T = max(len(x) for x in ids_list)
    input_ids = torch.full((len(ids_list), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), T), dtype=torch.long)
    rows, pos, targets, lengths = [], [], [], []
    for b, (ids, (s, e)) in enumerate(zip(ids_list, spans)):
        if not 1 <= s < e <= len(ids):
            raise ValueError(f"span {(s, e)} invalid for a sequence of {len(ids)} tokens (need 1 <= start < end <= len)")
        off = T - len(ids) if padding == "left" else 0
        input_ids[b, off:off + len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[b, off:off + len(ids)] = 1
        rows += [b] * (e - s)
        pos += range(off + s - 1, off + e - 1)
        targets += ids[s:e]
        lengths.append(e - s)
    return SpanBatch(input_ids, mask, torch.tensor(rows), torch.tensor(pos), torch.tensor(targets), lengths)


def topk_with_tail(lp_NV: torch.Tensor, k: int):
    """The top-k (values, indices) of log-prob rows (N, V), and the exact log-mass outside them (N,)."""
    top = lp_NV.topk(min(k, lp_NV.shape[-1]), dim=-1)
    return top, lp_NV.scatter(-1, top.indices, float("-inf")).logsumexp(-1)


@dataclass
class SpanScores:
    token_logprobs: list[torch.Tensor]  # (L_i,) per example
    topk_ids: list[torch.Tensor] | None = None  # (L_i, k)
    topk_logprobs: list[torch.Tensor] | None = None  # (L_i, k)
    topk_tail_logprobs: list[torch.Tensor] | None = None  # (L_i,) log Σ of the probabilities outside the top-k
    rows: list[torch.Tensor] | None = None  # (L_i, V)


@torch.no_grad()
def span_logprobs(model, ids_list: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], *, batch_size: int = 8,
                  padding: str = "right", top_k: int = 0, return_rows: bool = False, temperature: float = 1.0,
                  pad_id: int = 0) -> SpanScores:
    """Log-probs of the actual span tokens (and optionally top-k / full rows); see module docstring."""
    if len(ids_list) != len(spans):
        raise ValueError(f"{len(ids_list)} sequences but {len(spans)} spans")
    device = next(_causal_lm(model).parameters()).device
    out = SpanScores([], [] if top_k else None, [] if top_k else None, topk_tail_logprobs=[] if top_k else None,
                     rows=[] if return_rows else None)
    order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))  # similar lengths share a batch
    results: dict[int, tuple] = {}
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        b = collate([ids_list[i] for i in idx], [spans[i] for i in idx], pad_id=pad_id, padding=padding)
        logits_NV = span_logits(model, b.input_ids.to(device), b.attention_mask.to(device),
                                b.batch_idx.to(device), b.pos.to(device))
        lp_NV = torch.log_softmax(logits_NV.float() / temperature, dim=-1).cpu()  # (N, V)
        tok_N = lp_NV.gather(-1, b.targets.unsqueeze(-1)).squeeze(-1)  # (N,)
        top, tail_N = topk_with_tail(lp_NV, top_k) if top_k else (None, None)
        start = 0
        for i, n in zip(idx, b.lengths):
            sl = slice(start, start + n)
            results[i] = (tok_N[sl], top.indices[sl] if top else None, top.values[sl] if top else None,
                          lp_NV[sl].clone() if return_rows else None, tail_N[sl] if top else None)
            start += n
    for i in range(len(ids_list)):
        tok, ids, vals, rows, tail = results[i]
        out.token_logprobs.append(tok)
        if top_k:
            out.topk_ids.append(ids)
            out.topk_logprobs.append(vals)
            out.topk_tail_logprobs.append(tail)
        if return_rows:
            out.rows.append(rows)
    return out
