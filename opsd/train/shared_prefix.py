"""Teacher-forced scoring of sequences that share a prompt: the shared prefix runs once per group.

    from opsd.train.shared_prefix import Member, grouped_span_scores
    groups = [[Member(ids_a, (s, e), rows=True), Member(ids_b, (s2, e2))], ...]   # e.g. one group per task
    for scores in grouped_span_scores(model, groups, batch_size=8, pad_id=0):   # lazily, group by group
        scores[0]   # (e - s, V) fp32 log-prob rows (rows=True) ...
        scores[1]   # (e2 - s2,) fp32 log-probs of the actual tokens (rows=False)

Why: an evaluation scores the same task's prompt several times (the model's reply, the ground-truth
call, the reply with a hint turn above it), and a BFCL prompt with its tool schemas is most of each
sequence. Here the longest prefix every member of a group shares (capped so that every target
position stays after it) is run once, its KV cache is copied to the group's members, and only the
members' own tokens run on top of it. The numbers are those of `opsd.train.scoring.span_logprobs`
on each whole sequence (the same computation in another order; tests check it to 1e-5 in fp32).

Rows are padded as generation pads them: prefixes on the left, the members' own tokens on the right,
with explicit position ids, so a row's positions are those of its unpadded sequence. Runs under
`torch.no_grad()` in the model's current mode; the LM head (and log-softmax) runs only at target
positions, in fp32, one member at a time, so at most one member's (L, V) rows are built at once
beyond those returned.

Training uses the same continuation (`continue_from`) without a prefix pass of its own:
`logits_after_student` runs OPSD's teacher=self pass from the keys/values the student's forward already
computed for the tokens above the hint (`opsd.train.step.reuses_student_kv` says when that is exact).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from opsd.train.scoring import _causal_lm, head_logits


@dataclass(frozen=True)
class Member:
    ids: Sequence[int]
    span: tuple[int, int]  # [start, end) of the scored tokens, 1 <= start < end <= len(ids)
    rows: bool = False  # return (L, V) log-prob rows instead of the (L,) log-probs of the actual tokens


def shared_length(members: Sequence[Member]) -> int:
    """Tokens every member starts with, capped at the earliest span start - 1 (that position predicts the
    first target token, so it must run with the member's own tokens)."""
    for m in members:
        s, e = m.span
        if not 1 <= s < e <= len(m.ids):
            raise ValueError(f"span {(s, e)} invalid for a sequence of {len(m.ids)} tokens (need 1 <= start < end <= len)")
    n = min(m.span[0] for m in members) - 1
    for m in members[1:]:
        n = common_prefix(members[0].ids, m.ids, n)
    return n


def _scores(causal, hidden_LD: torch.Tensor, m: Member, temperature: float) -> torch.Tensor:
    lp_LV = torch.log_softmax(head_logits(causal, hidden_LD).float() / temperature, dim=-1).cpu()  # (L, V)
    if m.rows:
        return lp_LV
    return lp_LV.gather(-1, torch.tensor(list(m.ids[m.span[0]:m.span[1]]))[:, None])[:, 0]  # (L,)


@torch.no_grad()
def _batch(causal, groups: Sequence[Sequence[Member]], pad_id: int, temperature: float) -> list[list[torch.Tensor]]:
    dev = next(causal.parameters()).device
    decoder = causal.get_decoder()
    shared = [shared_length(g) for g in groups]
    Pm = max(shared)
    cache = DynamicCache()
    pre_mask = torch.zeros((len(groups), Pm), dtype=torch.long, device=dev)
    if Pm:  # the shared prefixes, left-padded to a common end
        pre_ids = torch.full((len(groups), Pm), pad_id, dtype=torch.long)
        for i, (g, P) in enumerate(zip(groups, shared)):
            if P:
                pre_ids[i, Pm - P:] = torch.tensor(list(g[0].ids[:P]))
                pre_mask[i, Pm - P:] = 1
        pos = (pre_mask.cumsum(-1) - 1).clamp(min=0)
        decoder(input_ids=pre_ids.to(dev), attention_mask=pre_mask, position_ids=pos, past_key_values=cache,
                use_cache=True)
    owner = [i for i, g in enumerate(groups) for _ in g]  # group of each member row
    members = [m for g in groups for m in g]
    if Pm:
        cache.batch_select_indices(torch.tensor(owner, device=dev))  # each member row gets its group's prefix KV
    hidden = continue_from(decoder, cache if Pm else None, pre_mask[owner], [shared[i] for i in owner],
                           [m.ids for m in members], pad_id)
    out: list[list[torch.Tensor]] = [[] for _ in groups]
    for r, (i, m) in enumerate(zip(owner, members)):
        s, e = m.span
        out[i].append(_scores(causal, hidden[r, s - 1 - shared[i]:e - 1 - shared[i]], m, temperature))
    return out


def continue_from(decoder, cache: DynamicCache | None, pre_mask_MP: torch.Tensor, shared: Sequence[int],
                  ids_list: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Hidden states (M, S, D) of each row's own tokens `ids_list[r][shared[r]:]`, right-padded to S, run on top
    of `cache` (M rows of P positions, row r attending to the positions where `pre_mask_MP[r]` is 1: its first
    `shared[r]` tokens, wherever they sit). Row r's own tokens take positions shared[r], shared[r] + 1, ...;
    `cache` is extended in place. With no cache (P = 0) the rows run from scratch."""
    dev = pre_mask_MP.device
    own = [len(ids) - n for ids, n in zip(ids_list, shared)]
    S = max(own)
    ids = torch.full((len(ids_list), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), S), dtype=torch.long)
    for r, (x, n, k) in enumerate(zip(ids_list, shared, own)):
        ids[r, :k] = torch.tensor(list(x[n:]))
        mask[r, :k] = 1
    pos = torch.tensor(list(shared))[:, None] + torch.arange(S)[None, :]  # (M, S); padding positions are masked
    return decoder(input_ids=ids.to(dev), attention_mask=torch.cat([pre_mask_MP.long(), mask.to(dev)], dim=1),
                   position_ids=pos.to(dev), past_key_values=cache, use_cache=cache is not None).last_hidden_state


def grouped_span_scores(model, groups: Sequence[Sequence[Member]], *, batch_size: int = 8, pad_id: int = 0,
                        temperature: float = 1.0) -> Iterator[list[torch.Tensor]]:
    """Per group, in order: one tensor per member (see the module docstring); `batch_size` groups per forward."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    causal = _causal_lm(model)
    for k in range(0, len(groups), batch_size):
        chunk = groups[k:k + batch_size]
        if any(not g for g in chunk):
            raise ValueError("a group has no members")
        yield from _batch(causal, chunk, pad_id, temperature)


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common start of `a` and `b`, at most `limit`."""
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@torch.no_grad()
def logits_after_student(lm, cache: DynamicCache, student_ids: Sequence[Sequence[int]],
                         teacher_ids: Sequence[Sequence[int]], teacher_spans: Sequence[tuple[int, int]],
                         pad_id: int = 0) -> torch.Tensor:
    """A teacher=self pass that starts from the student's own forward: logits (N, V) at the teacher spans.

    `cache` holds the keys/values the student's forward left (its rows right-padded, row b = student_ids[b]);
    the tokens row b's teacher sequence shares with it (everything above the hint turn) are not run again:
    only the rest of the teacher sequence (the hint and the reply) runs, on top of those keys/values
    (detached). Equal to running the whole teacher sequence when both passes see the same weights in the
    same mode (no dropout): the student's keys/values are the teacher's. Rows in order, span tokens in order,
    as `opsd.train.scoring.collate` lists them.
    """
    causal = _causal_lm(lm)
    shared = [common_prefix(s, t, sp[0] - 1) for s, t, sp in zip(student_ids, teacher_ids, teacher_spans)]
    Pm = max(shared)
    dev = next(causal.parameters()).device
    prefix = None
    if Pm:
        prefix = DynamicCache()
        for li, layer in enumerate(cache.layers):
            prefix.update(layer.keys[:, :, :Pm].detach(), layer.values[:, :, :Pm].detach(), li)
    pre_mask = (torch.arange(Pm)[None, :] < torch.tensor(shared)[:, None]).to(dev)  # (B, Pm): row b's shared tokens
    hidden = continue_from(causal.get_decoder(), prefix, pre_mask, shared, teacher_ids, pad_id)
    rows = [hidden[b, s - 1 - n:e - 1 - n] for b, ((s, e), n) in enumerate(zip(teacher_spans, shared))]
    return head_logits(causal, torch.cat(rows))
