"""One set of end-of-turn ids for every backend (`opsd.render.eot_ids`), generation config included.

A model whose generation_config.json adds an eos id (as Qwen-style models add `<|endoftext|>` next to
`<|im_end|>`): the hf decode loop stops on it, so a token-exact server rollout must too, or the same
reply is recorded with an extra trailing id by one backend and not by the other.
"""
from __future__ import annotations

import json
import shutil

import pytest

from opsd.io import models
from opsd.io.records import read_jsonl
from opsd.render import eot_ids
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import main as rollout_main
from tests.serve.stand_in import StandIn

EXTRA = "<|endoftext|>"  # in the SmolLM2 vocabulary, not the tokenizer's eos (that is <|im_end|>)


@pytest.fixture(scope="module")
def extra_eos_dir(tiny_dir, smol_tok, tmp_path_factory):
    """The tiny model, with one more eos id in its generation config than in its tokenizer."""
    d = tmp_path_factory.mktemp("extra_eos") / "model"
    shutil.copytree(tiny_dir, d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [smol_tok.eos_token_id, smol_tok.convert_tokens_to_ids(EXTRA)]
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d


def test_eot_ids_include_the_generation_config_from_a_loaded_model_or_its_dir(extra_eos_dir, smol_tok):
    extra = smol_tok.convert_tokens_to_ids(EXTRA)
    assert extra not in eot_ids(smol_tok)  # the tokenizer alone does not know it
    lm, tok = models.load(str(extra_eos_dir), device="cpu", precision="fp32")
    from_model, from_dir = eot_ids(tok, lm), eot_ids(tok, str(extra_eos_dir))
    assert from_model == from_dir == [tok.eos_token_id, extra]  # <|im_end|> first: the id that closes a reply
    assert eot_ids(tok, str(extra_eos_dir / "missing")) == [tok.eos_token_id]  # no config: the tokenizer's ids


class _EndsWithExtraEos(StandIn):
    """A server whose reply ends in the generation config's extra eos id, as a real engine's does when it
    stops on that id (include_stop_str_in_output, skip_special_tokens=False)."""

    def reply_text(self, model: str) -> str:
        return super().reply_text(model) + EXTRA


def test_completions_backend_drops_the_generation_config_eos_as_hf_does(extra_eos_dir, smol_tok, tmp_path):
    extra = smol_tok.convert_tokens_to_ids(EXTRA)
    out = tmp_path / "r.jsonl"
    cfg = RolloutConfig(tasks="bfcl:simple_python:heldout", limit=2, out=str(out), model=str(extra_eos_dir),
                        backend="completions", api_model="smollm2", max_new_tokens=64, concurrency=2, timeout=10.0,
                        base_url="http://127.0.0.1:1/v1", prefill="")
    with _EndsWithExtraEos(smol_tok) as srv:
        cfg.base_url = srv.base_url
        summary = rollout_main(cfg)
        sent = [b for b in srv.completions if b["max_tokens"] > 1]
        assert sent and smol_tok.encode(srv.reply_text("smollm2"), add_special_tokens=False)[-1] == extra
    assert summary["errors"] == 0 and summary["total"] == 2
    for row in read_jsonl(out):
        ids = row["messages"][-1]["token_ids"]
        assert ids and ids[-1] != extra and extra not in ids, ids  # the end-of-turn id is not part of the reply
        assert row["messages"][-1]["content"] == srv.reply_text("smollm2").removesuffix(EXTRA)
