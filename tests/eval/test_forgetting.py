"""The forgetting probe: KL(base || tuned) on the base model's greedy replies to general questions (tiny models)."""
from __future__ import annotations

import pytest

from opsd.eval.forgetting import base_replies, forgetting_kl, probe_prompts
from opsd.io import models
from tests.conftest import save_tiny


def test_probe_is_zero_for_the_base_itself_and_positive_for_other_weights(tiny_dir, smol_tok, tmp_path):
    other = save_tiny(tmp_path / "other", smol_tok, seed=5)
    replies = base_replies(str(tiny_dir), tmp_path / "probe", n=4, max_new_tokens=5, precision="fp32")
    assert len(replies) == 4 and all(0 < len(r["reply_ids"]) <= 5 for r in replies)
    assert len(probe_prompts(4)) == 4 and "?" in " ".join(probe_prompts(4)) + "?"
    base_lm, _ = models.load(str(tiny_dir), precision="fp32")
    other_lm, _ = models.load(str(other), precision="fp32")
    same = forgetting_kl(base_lm, base_lm, replies, n_boot=100)
    assert same["kl_per_token"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert same["n_tokens"] == sum(len(r["reply_ids"]) for r in replies)
    diff = forgetting_kl(base_lm, other_lm, replies, n_boot=100)
    assert diff["kl_per_token"]["mean"] > 0.01
    # cached: a second call reads the file (its content is what the first call wrote), a new n is a new file
    files = sorted((tmp_path / "probe").glob("*.jsonl"))
    assert base_replies(str(tiny_dir), tmp_path / "probe", n=4, max_new_tokens=5, precision="fp32") == replies
    base_replies(str(tiny_dir), tmp_path / "probe", n=3, max_new_tokens=5, precision="fp32")
    assert len(sorted((tmp_path / "probe").glob("*.jsonl"))) == len(files) + 1
