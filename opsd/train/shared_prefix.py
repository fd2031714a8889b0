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
    first = members[0].ids
    for m in members[1:]:
        i = 0
        while i < n and m.ids[i] == first[i]:
            i += 1
        n = i
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
    own = [len(m.ids) - shared[i] for i, m in zip(owner, members)]
    S = max(own)
    ids = torch.full((len(members), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(members), S), dtype=torch.long)
    for r, (i, m, n) in enumerate(zip(owner, members, own)):
        ids[r, :n] = torch.tensor(list(m.ids[shared[i]:]))
        mask[r, :n] = 1
    start = torch.tensor([shared[i] for i in owner])[:, None]  # (M, 1) position of each row's first own token
    pos = start + torch.arange(S)[None, :]  # (M, S); padding positions are masked, their values unused
    if Pm:
        cache.batch_select_indices(torch.tensor(owner, device=dev))  # each member row gets its group's prefix KV
    hidden = decoder(input_ids=ids.to(dev), attention_mask=torch.cat([pre_mask[owner], mask.to(dev)], dim=1),
                     position_ids=pos.to(dev), past_key_values=cache if Pm else None, use_cache=bool(Pm)).last_hidden_state
    out: list[list[torch.Tensor]] = [[] for _ in groups]
    for r, (i, m) in enumerate(zip(owner, members)):
        s, e = m.span
        out[i].append(_scores(causal, hidden[r, s - 1 - shared[i]:e - 1 - shared[i]], m, temperature))
    return out


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
