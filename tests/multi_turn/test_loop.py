"""The agent loop over BFCL's simulated environments: turns, caps, exact decoding with a kept cache, resumable rollouts."""
from __future__ import annotations

import json

import pytest
import torch

from opsd.io.tasks import bfcl_multi_turn as mt
from opsd.io.trajectories import load_trajectories, normalise
from opsd.rollout.multi_turn import CachedDecoder, EpisodeLimits, Reply, episode, play
from tests.multi_turn.conftest import (
    PREFILL,
    call_text,
    gt_script,
    play_script,
    script,
    task,
)


def test_ground_truth_replies_make_a_valid_episode_bfcl_accepts():
    t = task("multi_turn_base_0")
    traj = play_script(t, script(gt_script(t)))
    info = traj.meta["multi_turn"]
    assert traj.meta["finish_reason"] == "done" and info["turns_played"] == 4 == len(info["turn_starts"])
    assert [traj.messages[i]["role"] for i in info["turn_starts"]] == ["user"] * 4
    tools = [m for m in traj.messages if m["role"] == "tool"]
    calls = [c for m in traj.messages if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    assert len(tools) == len(calls) == sum(len(x) for x in info["ground_truth"])
    assert [m["tool_call_id"] for m in tools] == [c["id"] for c in calls]
    normalise(traj.to_dict())  # a valid trajectory record
    assert mt.official_check(traj.messages, traj.meta) == {"valid": True}
    # one wrong call and BFCL's own checker says so
    bad = gt_script(t)
    bad[0][2] = bad[0][2].replace('"temp"}', '"archive"}')
    traj = play_script(t, script(bad))
    assert mt.official_check(traj.messages, traj.meta)["valid"] is False


def test_tool_results_come_from_the_environment_and_are_clipped():
    t = task("multi_turn_base_1")
    traj = play_script(t, ['<tool_call>\n{"name": "ls", "arguments": {"a": true}}\n</tool_call>', "ok",
                           '<tool_call>\n{"name": "cd", "arguments": {"folder": "nowhere"}}\n</tool_call>', "x", "y", "z"])
    results = [m["content"] for m in traj.messages if m["role"] == "tool"]
    assert json.loads(results[0]) == {"current_directory_content": ["workspace"]}
    assert "No such directory" in results[1] or "error" in results[1].lower()
    echo = call_text("echo", {"content": "x" * 5000})  # echo without a file prints its content back
    traj = play_script(t, [echo, "done", "a", "b", "c"])
    shown = next(m["content"] for m in traj.messages if m["role"] == "tool")
    assert len(shown) < 2100 and shown.endswith("more characters cut]")


def test_step_cap_ends_the_episode_like_bfcl_force_quit():
    t = task("multi_turn_base_1")
    always = '<tool_call>\n{"name": "pwd", "arguments": {}}\n</tool_call>'
    msgs, extra = play(t, lambda req: Reply(always, None, "stop"), EpisodeLimits(max_steps_per_turn=3))
    assert extra["finish_reason"] == "max_steps" and extra["multi_turn"]["steps"] == 3
    assert extra["multi_turn"]["turns_played"] == 1
    assert mt.official_check(msgs, {**t.meta, "multi_turn": {**t.meta["multi_turn"], **extra["multi_turn"]}}) \
        ["error_type"] == "multi_turn:force_terminated"


def test_time_and_context_caps(monkeypatch):
    t = task("multi_turn_base_1")
    clock = iter(range(0, 10**6, 100))
    monkeypatch.setattr("opsd.rollout.multi_turn.time.monotonic", lambda: next(clock))
    msgs, extra = play(t, lambda req: Reply("text", None, "stop"), EpisodeLimits(episode_seconds=150))
    assert extra["finish_reason"] == "time_limit" and extra["multi_turn"]["turns_played"] == 1
    monkeypatch.undo()
    msgs, extra = play(t, lambda req: None, EpisodeLimits())
    assert extra["finish_reason"] == "context_full" and msgs == [] and extra["multi_turn"]["turns_played"] == 0


def test_prefill_only_opens_each_turn_by_default():
    t = task("multi_turn_base_1")
    seen = []

    def reply(req):
        seen.append(req.prefill)
        return Reply(req.prefill + ('{"name": "pwd", "arguments": {}}\n</tool_call>' if req.prefill else "done"),
                     None, "stop")

    play(t, reply, EpisodeLimits(), prefill=PREFILL)
    assert seen == [PREFILL, ""] * 4
    seen.clear()
    play(t, reply, EpisodeLimits(max_steps_per_turn=2, prefill_steps="every_step"), prefill=PREFILL)
    assert seen == [PREFILL, PREFILL]


def test_held_out_functions_become_callable_at_their_turn():
    t = task("multi_turn_miss_func_5")
    call = '<tool_call>\n{"name": "post_tweet", "arguments": {"content": "hi"}}\n</tool_call>'
    replies = iter([call, "a", "b", "c", call, "d", "e"])
    msgs, _ = play(t, lambda req: Reply(next(replies), None, "stop"), EpisodeLimits())
    results = [m["content"] for m in msgs if m["role"] == "tool"]
    assert results[0].startswith("Error during execution: function 'post_tweet' is not available")
    assert "Error" not in results[1] or "authenticat" in results[1].lower()


def test_episode_is_a_generator_of_requests():
    t = task("multi_turn_base_1")
    gen = episode(t, EpisodeLimits())
    req = next(gen)
    assert req.messages == t.messages and req.tools == t.tools


@pytest.fixture(scope="module")
def tiny_8k(tmp_path_factory, smol_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    d = tmp_path_factory.mktemp("tiny-8k")
    LlamaForCausalLM(cfg).save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


def test_kept_cache_decoding_equals_full_recompute(tiny_8k):
    from opsd.io import models

    model, tok = models.load(str(tiny_8k), device="cpu")
    dec = CachedDecoder(model, tok, max_new_tokens=8)
    p1 = tok("hello there, general", add_special_tokens=False)["input_ids"]
    out1, _ = dec.generate(p1)
    p2 = p1 + out1 + tok(" and then some more text", add_special_tokens=False)["input_ids"]
    out2, _ = dec.generate(p2)
    assert len(dec.encoded) >= len(p2)  # the second reply reused the first one's cache
    for p, out in ((p1, out1), (p2, out2)):
        ref = model.generate(torch.tensor([p]), max_new_tokens=len(out), do_sample=False,
                             attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
        assert ref[:len(out)] == out
    p3 = p1[:3] + tok(" different", add_special_tokens=False)["input_ids"]  # a prompt that diverges: cache cropped
    out3, _ = dec.generate(p3)
    ref = model.generate(torch.tensor([p3]), max_new_tokens=len(out3), do_sample=False,
                         attention_mask=torch.ones(1, len(p3), dtype=torch.long))[0, len(p3):].tolist()
    assert ref[:len(out3)] == out3


def test_rollout_runs_multi_turn_tasks_without_extra_flags_and_resumes(tiny_8k, tmp_path):
    from opsd.rollout.run import RolloutConfig, load_rollouts, main

    out = tmp_path / "r.jsonl"
    cfg = RolloutConfig(tasks="bfcl:multi_turn_base:heldout", out=str(out), model=str(tiny_8k), limit=2,
                        max_new_tokens=4, prefill=PREFILL, device="cpu", max_steps_per_turn=2)
    s1 = main(cfg)
    assert s1["written_now"] == 2 and s1["errors"] == 0
    trajs = load_trajectories(out)  # valid records
    assert len(trajs) == 2 and all(t.meta["multi_turn"]["turns_played"] >= 1 for t in trajs)
    first = next(m for m in trajs[0].messages if m["role"] == "assistant")
    assert first["prefill"] == PREFILL and first["content"].startswith(PREFILL) and first["token_ids"]
    assert main(cfg)["written_now"] == 0 and len(load_rollouts(cfg)) == 2
    single = RolloutConfig(tasks="bfcl:simple_python:train", out="x", model=str(tiny_8k))
    assert single.hash() == RolloutConfig(tasks="y", out="z", model=str(tiny_8k), max_steps_per_turn=8).hash()
    assert single.hash() != RolloutConfig(tasks="y", out="z", model=str(tiny_8k), max_steps_per_turn=3).hash()
