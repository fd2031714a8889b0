"""opsd.train.scoring details the Llama-based tests cannot see: collate's exact layout and checks, absolute
position embeddings under left padding (GPT-2), final-logit soft-capping, the wrappers that are unwrapped,
and the fp32 head under bf16 autocast. Found with `make mutation`."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from opsd.train.scoring import SpanLM, _causal_lm, collate, span_logits, span_logprobs
from tests.conftest import tiny_llama

IDS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
SPANS = [(2, 7), (1, 3)]


def reference_logprobs(model, ids_list, spans):
    """Per example: log-probs of the span tokens from a full forward of the unpadded sequence."""
    out = []
    with torch.no_grad():
        for ids, (s, e) in zip(ids_list, spans):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, s - 1:e - 1].float(), -1)  # (L, V)
            out.append(lp.gather(-1, torch.tensor(ids[s:e]).unsqueeze(-1)).squeeze(-1))
    return out


def test_collate_layout_right_and_left():
    right = collate([[5, 6, 7], [8, 9]], [(1, 3), (1, 2)])
    assert right.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]  # pad_id defaults to 0
    assert right.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert right.input_ids.dtype == right.attention_mask.dtype == torch.long
    assert right.batch_idx.tolist() == [0, 0, 1] and right.pos.tolist() == [0, 1, 0]
    assert right.targets.tolist() == [6, 7, 9] and right.lengths == [2, 1]
    left = collate([[5, 6, 7], [8, 9]], [(1, 3), (1, 2)], pad_id=2, padding="left")
    assert left.input_ids.tolist() == [[5, 6, 7], [2, 8, 9]]
    assert left.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert left.input_ids.dtype == left.attention_mask.dtype == torch.long
    assert left.batch_idx.tolist() == [0, 0, 1] and left.pos.tolist() == [0, 1, 1]
    assert left.targets.tolist() == [6, 7, 9] and left.lengths == [2, 1]


def test_collate_rejects_bad_spans_and_padding():
    with pytest.raises(ValueError, match=r"^padding must be 'right' or 'left', got 'center'$"):
        collate([[1, 2, 3]], [(1, 3)], padding="center")
    for span in ((0, 2), (2, 2), (2, 1), (1, 4)):
        with pytest.raises(ValueError, match=rf"^span \({span[0]}, {span[1]}\) invalid for a sequence of 3 tokens "
                                             r"\(need 1 <= start < end <= len\)$"):
            collate([[1, 2, 3]], [span])


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("padding", ["right", "left"])
def test_absolute_position_embeddings_see_unpadded_positions(padding):
    """GPT-2 adds a learned embedding per absolute position: a left-padded row must still start at position 0."""
    model = tiny_gpt2()
    got = span_logprobs(model, IDS, SPANS, padding=padding, batch_size=2).token_logprobs
    for g, want in zip(got, reference_logprobs(model, IDS, SPANS)):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def test_final_logit_softcapping_is_applied():
    model = tiny_llama(64, seed=4)
    b = collate(IDS, SPANS, pad_id=2)
    with torch.no_grad():
        plain = span_logits(model, b.input_ids, b.attention_mask, b.batch_idx, b.pos)  # (N, V)
        model.config.final_logit_softcapping = 0.05  # small enough to bend these random logits
        capped = span_logits(model, b.input_ids, b.attention_mask, b.batch_idx, b.pos)
    torch.testing.assert_close(capped, torch.tanh(plain / 0.05) * 0.05)
    assert capped.abs().max() <= 0.05 < plain.abs().max()


class FullyShardedDataParallel(nn.Module):  # recognised by its class name, as torch's FSDP wrapper
    def __init__(self, module):
        super().__init__()
        self.module = module


class PeftLike(nn.Module):
    """What opsd uses of a peft model: `get_base_model()` (LoRA layers live in the base model)."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def get_base_model(self):
        return self.base


def test_wrappers_are_unwrapped_to_the_causal_lm():
    model = tiny_llama(64, seed=5)
    for wrapped in (SpanLM(model), FullyShardedDataParallel(model), PeftLike(model),
                    SpanLM(FullyShardedDataParallel(PeftLike(model)))):
        assert _causal_lm(wrapped) is model
    got = span_logprobs(SpanLM(PeftLike(model)), IDS, SPANS, padding="left").token_logprobs
    for g, want in zip(got, reference_logprobs(model, IDS, SPANS)):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def test_head_runs_in_fp32_under_bf16_autocast():
    model = tiny_llama(64, seed=6)
    b = collate(IDS, SPANS, pad_id=2)
    with torch.no_grad():
        fp32 = span_logits(model, b.input_ids, b.attention_mask, b.batch_idx, b.pos)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = span_logits(model, b.input_ids, b.attention_mask, b.batch_idx, b.pos)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, fp32, atol=0.05, rtol=0.05)  # the decoder ran in bf16, the head did not
