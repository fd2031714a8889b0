"""Rollouts: exact greedy decoding, parsing, resumability, nothing dropped, precision, the reply prefill."""
import json

import pytest
import torch

from opsd.io.tasks import load_tasks
from opsd.io.trajectories import load_trajectories
from opsd.rollout.hf import DecodeStats, PreallocatedLayer, auto_batch_size, shared_prefix_length
from opsd.rollout.run import (
    RolloutConfig,
    generate_batch,
    main,
    parse_calls,
    prefill_arg,
)


def test_parse_calls_cases():
    calls, err = parse_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')
    assert err is None and calls[0]["function"]["name"] == "f" and json.loads(calls[0]["function"]["arguments"]) == {"a": 1}
    calls, err = parse_calls('<tool_call>\n{"name": "f", "arguments": {"a": ')
    assert not calls and "cut off" in err
    calls, err = parse_calls("I cannot help with that.")
    assert not calls and err == "no tool call in reply"
    calls, err = parse_calls('<tool_call>\n{"name": f}\n</tool_call>')
    assert not calls and "tool call 0" in err


def test_prefill_arg_decodes_escapes_and_keeps_text():
    assert prefill_arg("<tool_call>\\n") == "<tool_call>\n"
    assert prefill_arg("Réponse :\\t") == "Réponse :\t"  # non-ASCII is not mangled
    assert prefill_arg("") == ""  # explicit: no prefill
    assert prefill_arg(None) is None  # the model's default


@pytest.mark.slow
def test_batched_decode_matches_hf_generate_greedy(smol_model):
    from opsd.render import prompt_ids

    model, tok = smol_model
    tasks = load_tasks("bfcl:simple_python:train", limit=4)
    pre = tok("<tool_call>\n", add_special_tokens=False)["input_ids"]
    prompts = [prompt_ids(t.messages, t.tools, tok) + pre for t in tasks]
    prompts.insert(1, prompts[0])  # two samples of one task: one prefill, shared KV
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    stats = DecodeStats()
    res = generate_batch(model, tok, prompts, max_new_tokens=24, stop_text=["</tool_call>"] * 5, stats=stats)
    shared = shared_prefix_length([prompts[0]] + prompts[2:])
    assert shared >= 16  # the tools preamble: prefilled once, then each prompt's own tokens
    assert stats.shared_prompt_tokens == len(prompts[0]) + 3 * shared and stats.rows == 5
    for p, (ids, finish) in zip(prompts, res):
        ref = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p):].tolist()
        assert len(ids) == 24 and finish == "length"  # no stop within 24 tokens: the whole budget is compared
        assert ids == ref


def test_rollout_resumes_without_duplicates_and_keeps_unparsable(tiny_model_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    cfg = RolloutConfig(tasks="bfcl:simple_python:train", out=str(out), model=str(tiny_model_dir), limit=2,
                        max_new_tokens=6, batch_size=2, prefill="<tool_call>\n", device="cpu", precision="fp32")
    s1 = main(cfg)
    assert s1["written_now"] == 2 and s1["total"] == 2
    cfg.limit = 3
    s2 = main(cfg)
    assert s2["written_now"] == 1 and s2["total"] == 3
    trajs = load_trajectories(out)  # validated against the trajectory schema
    first3 = [t.id for t in load_tasks("bfcl:simple_python:train", limit=3)]
    assert sorted(t.meta["task_id"] for t in trajs) == sorted(first3)  # each of the first 3 tasks exactly once
    for t in trajs:
        a = t.messages[-1]
        assert a["role"] == "assistant" and a["content"].startswith("<tool_call>\n")
        assert a["prefill"] == "<tool_call>\n"  # the forced part of the reply, recorded
        assert t.meta["precision"] == "fp32"
        assert t.meta["parse_error"]  # a random model never closes its call: kept, with the reason
        assert t.meta["ground_truth"] and t.meta["task_id"].startswith("simple_python_")
        assert len(a["token_ids"]) >= 1
    # rendering uses the recorded ids verbatim
    from opsd.io.models import load_tokenizer
    from opsd.render import render

    tok = load_tokenizer(str(tiny_model_dir))
    r = render(trajs[0], tok)
    bs, be = r.body_spans[-1]
    assert r.input_ids[bs:be] == trajs[0].messages[-1]["token_ids"]


def test_no_prefill_no_prefill_key(tiny_model_dir, tmp_path):
    cfg = RolloutConfig(tasks="bfcl:simple_python:train", out=str(tmp_path / "r.jsonl"), model=str(tiny_model_dir),
                        limit=1, max_new_tokens=3, prefill="", device="cpu", precision="fp32")
    main(cfg)
    (t,) = load_trajectories(tmp_path / "r.jsonl")
    assert "prefill" not in t.messages[-1]


def _greedy(model, tok, prompts, stop_text, n=8):
    return generate_batch(model, tok, prompts, max_new_tokens=n, stop_text=stop_text)


@pytest.mark.slow
def test_finished_rows_leave_the_batch_without_changing_the_others(smol_model):
    """A row that stops early is dropped from the KV cache (compaction); the other rows' tokens are
    those of a run where nobody stopped, and shared prompts give identical greedy replies."""
    from opsd.render import prompt_ids

    model, tok = smol_model
    tasks = load_tasks("bfcl:simple_python:train", limit=4)
    prompts = [prompt_ids(t.messages, t.tools, tok) for t in tasks]
    prompts.insert(2, prompts[1])
    free = _greedy(model, tok, prompts, [None] * 5)
    assert free[1] == free[2]  # two samples of one prompt, greedy
    stop = tok.decode(free[0][0][:3])  # row 0 stops after its 3rd token; 1 of 5 rows >= a quarter: compaction
    stopped = _greedy(model, tok, prompts, [stop] + [None] * 4)
    assert stopped[0] == (free[0][0][:3], "stop")
    assert stopped[1:] == free[1:]
    # the same rows decoded in a different batch give the same tokens
    assert _greedy(model, tok, prompts[3:], [None] * 2) == free[3:]


def test_preallocated_layer_matches_dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    pre, dyn = PreallocatedLayer(capacity=10), DynamicLayer()
    for n in (4, 1, 1, 3):
        k, v = torch.randn(3, 2, n, 5), torch.randn(3, 2, n, 5)
        for a, b in zip(pre.update(k, v), dyn.update(k, v)):
            assert torch.equal(a, b)
    idx = torch.tensor([2, 0])
    pre.batch_select_indices(idx)
    dyn.batch_select_indices(idx)
    assert pre.get_seq_length() == dyn.get_seq_length() == 9
    k, v = torch.randn(2, 2, 1, 5), torch.randn(2, 2, 1, 5)
    for a, b in zip(pre.update(k, v), dyn.update(k, v)):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="KV cache full"):
        pre.update(k, v)


def test_auto_batch_size_from_memory(tiny_model_dir):
    from opsd.io import models

    model, _ = models.load(str(tiny_model_dir), device="cpu", precision="fp32")
    kv_row = 2 * 2 * 2 * 8 * (300 + 100) * 4  # layers x kv heads x head dim x tokens x fp32, keys and values
    logits_row = 2 * model.config.vocab_size * 4
    rows = auto_batch_size(model, max_prompt_tokens=300, max_new_tokens=100, free_bytes=40 * (kv_row + logits_row))
    assert rows == 10  # a quarter of free memory
    assert auto_batch_size(model, max_prompt_tokens=300, max_new_tokens=100, free_bytes=0) == 1
    assert auto_batch_size(model, max_prompt_tokens=300, max_new_tokens=100, free_bytes=1 << 50) == 64  # CPU cap


def test_precision_in_config_key_and_meta(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="precision: must be one of auto, fp32, bf16"):
        RolloutConfig(precision="fp16")
    with pytest.raises(ValueError, match="batch_size"):
        RolloutConfig(batch_size=-1)
    kw = {"tasks": "bfcl:simple_python:train", "out": str(tmp_path / "r.jsonl"), "model": str(tiny_model_dir), "limit": 1,
          "max_new_tokens": 3, "device": "cpu"}
    fp32, bf16 = RolloutConfig(precision="fp32", **kw), RolloutConfig(precision="bf16", **kw)
    assert fp32.hash() != bf16.hash()  # bf16 replies are never served for an fp32 run, or back
    s = main(bf16)
    assert s["decode"]["generated_tokens"] >= 1 and s["decode"]["prompt_tokens"] > 0
    (t,) = load_trajectories(tmp_path / "r.jsonl")
    assert t.meta["precision"] == "bf16"


def test_shared_prefix_length():
    assert shared_prefix_length([list(range(40)) + [1], list(range(40)) + [2, 3]]) == 40
    assert shared_prefix_length([list(range(40)), list(range(40)) + [5]]) == 39  # each prompt keeps a token of its own
    assert shared_prefix_length([list(range(10)) + [1], list(range(10)) + [2]]) == 0  # below MIN_SHARED_PREFIX
    assert shared_prefix_length([list(range(40))]) == 0
