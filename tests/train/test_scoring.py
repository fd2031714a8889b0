"""Span-only compute equals the full-logits reference; padding side does not matter."""
from __future__ import annotations

import torch

from opsd.hint.build import build_examples
from opsd.train.losses import token_divergence
from opsd.train.scoring import SpanLM, collate, span_logits, span_logprobs
from tests.conftest import tiny_llama


def full_reference(model, ids_list, spans):
    """Per example: full (T, V) logits of the unpadded sequence, rows predicting the span tokens."""
    out = []
    with torch.no_grad():
        for ids, (s, e) in zip(ids_list, spans):
            logits_TV = model(torch.tensor([ids])).logits[0]  # (T, V)
            out.append(logits_TV[s - 1:e - 1])
    return out


def examples(smol_tok, trajectories, critiques, span="step"):
    exs, _ = build_examples(trajectories, critiques, smol_tok, span=span)
    return exs


def test_span_only_equals_full_logits(smol_tok, trajectories, critiques):
    model = tiny_llama(len(smol_tok), seed=1)
    exs = examples(smol_tok, trajectories, critiques)
    ids = [e.teacher_ids for e in exs] + [e.student_ids for e in exs]
    spans = [e.teacher_span for e in exs] + [e.student_span for e in exs]
    ref = torch.cat(full_reference(model, ids, spans))  # (N, V)
    b = collate(ids, spans, pad_id=2)
    with torch.no_grad():
        got = span_logits(model, b.input_ids, b.attention_mask, b.batch_idx, b.pos)  # (N, V)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # and the loss built on them (student rows vs teacher rows)
    n = sum(b.lengths[:len(exs)])
    loss_span = token_divergence(got[n:], got[:n]).mean()
    loss_ref = token_divergence(ref[n:], ref[:n]).mean()
    assert abs(loss_span.item() - loss_ref.item()) < 1e-5
    # the gradient path through SpanLM is the same as through the full forward
    model.train()
    student = collate([e.student_ids for e in exs], [e.student_span for e in exs], pad_id=2)
    SpanLM(model)(student.input_ids, student.attention_mask, student.batch_idx, student.pos).logsumexp(-1).sum().backward()
    g_span = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0
    for e in exs:
        s0, s1 = e.student_span
        total = total + model(torch.tensor([e.student_ids])).logits[0, s0 - 1:s1 - 1].logsumexp(-1).sum()
    total.backward()
    for a, p in zip(g_span, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


def test_span_logprobs_padding_sides_agree(smol_tok, trajectories, critiques):
    model = tiny_llama(len(smol_tok), seed=2)
    exs = examples(smol_tok, trajectories, critiques, span="step_from_error")
    ids, spans = [e.student_ids for e in exs], [e.student_span for e in exs]
    right = span_logprobs(model, ids, spans, batch_size=4, padding="right", top_k=8, return_rows=True)
    left = span_logprobs(model, ids, spans, batch_size=3, padding="left", top_k=8)
    ref = full_reference(model, ids, spans)
    for i, (e, r) in enumerate(zip(exs, ref)):
        want = torch.log_softmax(r, -1).gather(-1, torch.tensor(ids[i][spans[i][0]:spans[i][1]]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(right.token_logprobs[i], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(left.token_logprobs[i], want, atol=1e-5, rtol=1e-5)
        assert torch.equal(right.topk_ids[i], left.topk_ids[i])
        assert right.rows[i].shape == (spans[i][1] - spans[i][0], len(smol_tok))
        torch.testing.assert_close(right.rows[i].gather(-1, right.topk_ids[i]), right.topk_logprobs[i])


def test_peft_model_is_unwrapped(smol_tok, trajectories, critiques):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(len(smol_tok), seed=3), LoraConfig(r=4, target_modules="all-linear"))
    exs = examples(smol_tok, trajectories, critiques, span="quote")[:2]
    s = span_logprobs(model, [e.student_ids for e in exs], [e.student_span for e in exs])
    ref = full_reference(model, [e.student_ids for e in exs], [e.student_span for e in exs])
    want = torch.log_softmax(ref[0], -1).gather(-1, torch.tensor(exs[0].student_ids[slice(*exs[0].student_span)]).unsqueeze(-1))
    torch.testing.assert_close(s.token_logprobs[0], want.squeeze(-1), atol=1e-5, rtol=1e-5)
