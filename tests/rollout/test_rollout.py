"""Rollouts: exact greedy decoding, parsing, resumability, nothing dropped."""
import json

import pytest
import torch

from opsd.io.trajectories import load_trajectories
from opsd.rollout.run import (
    RolloutConfig,
    generate_batch,
    main,
    parse_reply,
    prefill_arg,
)


def test_parse_reply_cases():
    calls, err = parse_reply('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')
    assert err is None and calls[0]["function"]["name"] == "f" and json.loads(calls[0]["function"]["arguments"]) == {"a": 1}
    calls, err = parse_reply('<tool_call>\n{"name": "f", "arguments": {"a": ')
    assert not calls and "cut off" in err
    calls, err = parse_reply("I cannot help with that.")
    assert not calls and err == "no tool call in reply"
    calls, err = parse_reply('<tool_call>\n{"name": f}\n</tool_call>')
    assert not calls and "tool call 0" in err


def test_prefill_arg_decodes_escapes_and_keeps_text():
    assert prefill_arg("<tool_call>\\n") == "<tool_call>\n"
    assert prefill_arg("Réponse :\\t") == "Réponse :\t"  # non-ASCII is not mangled
    assert prefill_arg("") == ""  # explicit: no prefill
    assert prefill_arg(None) is None  # the model's default


@pytest.mark.slow
def test_batched_decode_matches_hf_generate_greedy(smol_model):
    from opsd.io.tasks import load_tasks
    from opsd.render import prompt_ids

    model, tok = smol_model
    tasks = load_tasks("bfcl:simple_python:train", limit=4)
    pre = tok("<tool_call>\n", add_special_tokens=False)["input_ids"]
    prompts = [prompt_ids(t.messages, t.tools, tok) + pre for t in tasks]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    res = generate_batch(model, tok, prompts, max_new_tokens=24, stop_text=["</tool_call>"] * 4)
    for p, (ids, finish) in zip(prompts, res):
        ref = model.generate(torch.tensor([p]), max_new_tokens=len(ids), do_sample=False)[0, len(p):].tolist()
        assert ref[:len(ids)] == ids
        assert finish in ("length", "stop", "eos")


def test_rollout_resumes_without_duplicates_and_keeps_unparsable(tiny_model_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    cfg = RolloutConfig(tasks="bfcl:simple_python:train", out=str(out), model=str(tiny_model_dir), limit=2,
                        max_new_tokens=6, batch_size=2, prefill="<tool_call>\n", device="cpu")
    s1 = main(cfg)
    assert s1["written_now"] == 2 and s1["total"] == 2
    cfg.limit = 3
    s2 = main(cfg)
    assert s2["written_now"] == 1 and s2["total"] == 3
    trajs = load_trajectories(out)
    assert [t.meta["task_id"] for t in trajs] == [t.meta["task_id"] for t in trajs][:3] and len(trajs) == 3
    assert len({t.id for t in trajs}) == 3
    for t in trajs:
        a = t.messages[-1]
        assert a["role"] == "assistant" and a["content"].startswith("<tool_call>\n")
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
