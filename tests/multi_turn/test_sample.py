"""data/sample_multi_turn.jsonl: a real multi-turn rollout of the embedded model, as `opsd rollout` writes it."""
from __future__ import annotations

import asyncio

from opsd_critic import make_critic
from opsd.io.tasks import bfcl_multi_turn as mt
from opsd.io.trajectories import load_trajectories
from opsd.render import message_text, render
from tests.conftest import DATA

SAMPLE = DATA / "sample_multi_turn.jsonl"


def test_sample_loads_critiques_and_is_scored_like_documented(smol_tokenizer):
    (traj,) = load_trajectories(SAMPLE)
    info = traj.meta["multi_turn"]
    assert info["bfcl_id"] == "multi_turn_base_70" and mt.split_of(info["bfcl_id"]) == "train"
    assert [traj.messages[i]["role"] for i in info["turn_starts"]] == ["user", "user"]
    c = asyncio.run(make_critic("schema+reference").critique(traj))
    assert (c.verdict, c.step, c.category, c.quote) == ("error", 1, "unknown_tool", "fuel-tank-replenishment-function-1")
    assert c.quote not in c.hint and "liter_to_gallon" in c.hint  # the ground truth's next call
    out = mt.official_check(traj.messages, traj.meta)
    assert out["valid"] is False and out["error_type"] == "multi_turn:empty_turn_model_response"  # no decodable call
    r = render(traj, smol_tokenizer)  # the generated ids are used verbatim
    s, e = r.body_spans[1]
    assert r.input_ids[s:e] == traj.messages[1]["token_ids"]
    assert message_text(traj.messages[1]).startswith(traj.messages[1]["prefill"])
