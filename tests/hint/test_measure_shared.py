"""`measure(lm, lm, ...)` (the shared-prompt path) gives the numbers of two separate passes."""
from __future__ import annotations

import copy

import pytest
import torch

from opsd.hint.build import build_examples
from opsd.hint.measure import measure
from tests.conftest import tiny_llama


@pytest.mark.parametrize("top_k,temperature", [(0, 1.0), (16, 1.0), (16, 2.0)])
def test_shared_prompt_measure_equals_two_passes(smol_tok, trajectories, critiques, top_k, temperature):
    lm = tiny_llama(len(smol_tok), seed=2)
    exs, _ = build_examples(trajectories, critiques, smol_tok)
    assert len(exs) >= 4
    shared = measure(lm, lm, exs, batch_size=3, top_k=top_k, temperature=temperature, pad_id=2)
    separate = measure(copy.deepcopy(lm), lm, exs, batch_size=3, top_k=top_k, temperature=temperature, pad_id=2)
    assert len(shared) == len(separate) == len(exs)
    for a, b in zip(shared, separate):
        for k, v in b.scores().items():
            assert a.scores()[k] == pytest.approx(v, abs=1e-5), k
        assert (a.teacher_topk is None) == (b.teacher_topk is None) == (top_k == 0)
        if top_k:
            ta, tb = a.teacher_topk, b.teacher_topk
            assert ta.ids == tb.ids
            for x, y in ((ta.logprobs, tb.logprobs), (ta.tail_logprobs, tb.tail_logprobs),
                         (ta.target_logprobs, tb.target_logprobs)):
                torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=1e-5)
