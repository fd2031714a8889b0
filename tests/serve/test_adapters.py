"""Putting each round's student into a server: vLLM and SGLang LoRA endpoints (against the stand-in),
provenance recorded in rollouts, failed loads, and exact flattening of stacked adapters."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opsd.io.records import read_jsonl
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import main as rollout_main
from opsd.serve.adapters import (
    SERVED_RECORD,
    AdapterClient,
    AdapterError,
    adapter_chain,
    files_hash,
    flatten_adapters,
    publish_adapter,
    served_weights,
)
from tests.serve.stand_in import StandIn


def make_adapter(dest: Path, *, base: str = "smollm2-135m-instruct", r: int = 8, seed: int = 0,
                 weights: bool = True) -> Path:
    """A small PEFT-format LoRA adapter dir (two modules) with random weights; no model needed."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod in ("q_proj", "v_proj"):
        p = f"base_model.model.model.layers.0.self_attn.{mod}"
        sd[p + ".lora_A.weight"] = torch.randn(r, 16, generator=g)
        sd[p + ".lora_B.weight"] = torch.randn(16, r, generator=g)
    if weights:
        save_file(sd, str(dest / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": base, "task_type": "CAUSAL_LM"}
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


def _rollout(srv, out, model, n=2):
    cfg = RolloutConfig(tasks="bfcl:simple_python:heldout", limit=n, out=str(out), backend="completions",
                        base_url=srv.base_url, api_model=model, max_new_tokens=32, timeout=10.0)
    rollout_main(cfg)
    return list(read_jsonl(out))


def test_vllm_publish_loads_lists_and_unloads_the_previous_round(tmp_path, smol_tokenizer):
    r0 = make_adapter(tmp_path / "round_0" / "train" / "model", seed=0)
    r1 = make_adapter(tmp_path / "round_1" / "train" / "model", seed=1)
    with StandIn(smol_tokenizer) as srv:
        srv.model_name = "smollm2"
        name0 = publish_adapter(srv, tmp_path / "round_0" / "train", previous="smollm2", label="round_0")
        assert name0 == "round_0-" + files_hash(r0)[:10]
        assert srv.loaded == {name0: str(r0.resolve())}
        assert [r for r, _ in srv.admin] == ["/v1/load_lora_adapter"]  # round 0 replaced the base: nothing unloaded
        rows0 = _rollout(srv, tmp_path / "r0.jsonl", name0)
        name1 = publish_adapter(srv, tmp_path / "round_1" / "train", previous=name0, label="round_1")
        assert name1 != name0 and list(srv.loaded) == [name1]  # the previous round is unloaded
        rows1 = _rollout(srv, tmp_path / "r1.jsonl", name1)
        listed = {m["id"]: m for m in AdapterClient(srv.root_url).models()}
    assert listed[name1]["root"] == str(r1.resolve())
    for rows, name, path in ((rows0, name0, r0), (rows1, name1, r1)):
        for row in rows:  # recorded provenance, and the stand-in answers with the name of the model asked
            assert row["meta"]["weights"] == {"model": name, "adapter": name, "path": str(path.resolve()),
                                              "hash": files_hash(path)}
            assert row["messages"][-1]["tool_calls"][0]["function"]["name"] == name
    record = json.loads((r1 / SERVED_RECORD).read_text())
    assert record["name"] == name1 and record["hash"] == files_hash(r1)


def test_retrained_adapter_gets_a_new_name(tmp_path, smol_tokenizer):
    d = make_adapter(tmp_path / "run" / "model", seed=0)
    with StandIn(smol_tokenizer) as srv:
        srv.model_name = "smollm2"
        first = publish_adapter(srv, d)
        make_adapter(d, seed=5)  # retrained in place
        second = publish_adapter(srv, d, previous=first)
    assert first != second and first.rsplit("-", 1)[0] == second.rsplit("-", 1)[0] == "model"


def test_refused_load_raises_and_keeps_the_previous_adapter(tmp_path, smol_tokenizer):
    good = make_adapter(tmp_path / "good", seed=0)
    broken = make_adapter(tmp_path / "broken", weights=False)  # config without weights: vLLM refuses it
    with StandIn(smol_tokenizer) as srv:
        srv.model_name = "smollm2"
        name = publish_adapter(srv, good)
        with pytest.raises(AdapterError, match=r"refused adapter 'broken-.*HTTP 404.*No adapter found"):
            publish_adapter(srv, broken, previous=name)
        assert list(srv.loaded) == [name]  # still serving the previous round


def test_full_weights_and_missing_adapters_are_clear_errors(tmp_path, smol_tokenizer):
    full = tmp_path / "full" / "model"
    full.mkdir(parents=True)
    (full / "config.json").write_text("{}")
    with StandIn(smol_tokenizer) as srv:
        srv.model_name = "smollm2"
        with pytest.raises(AdapterError, match="full weights, not a LoRA adapter"):
            publish_adapter(srv, tmp_path / "full")
        with pytest.raises(AdapterError, match="no adapter_config.json"):
            publish_adapter(srv, tmp_path / "empty")


def test_sglang_endpoints(tmp_path, smol_tokenizer):
    a0 = make_adapter(tmp_path / "a0", seed=0)
    a1 = make_adapter(tmp_path / "a1", seed=1)
    with StandIn(smol_tokenizer, engine="sglang") as srv:
        srv.model_name, srv.engine = "smollm2", "sglang"
        m0 = publish_adapter(srv, a0, label="round_0")
        assert m0.startswith("smollm2:round_0-")  # SGLang selects an adapter as BASE:ADAPTER
        m1 = publish_adapter(srv, a1, previous=m0, label="round_1")
        routes = [r for r, _ in srv.admin]
        assert routes == ["/load_lora_adapter", "/load_lora_adapter", "/unload_lora_adapter"]
        rows = _rollout(srv, tmp_path / "r.jsonl", m1)
        assert all(r["meta"]["weights"]["adapter"] == m1.split(":", 1)[1] for r in rows)
        assert all(r["meta"]["weights"]["hash"] == files_hash(a1) for r in rows)
        client = AdapterClient(srv.root_url, engine="sglang", base_model="smollm2")
        with pytest.raises(AdapterError, match="cannot load"):
            client.load("bad", tmp_path / "nowhere")
        full = tmp_path / "full"
        full.mkdir()
        (full / "config.json").write_text("{}")
        client.update_weights(full)
        assert served_weights(client, "smollm2")["path"] == str(full)
        with pytest.raises(AdapterError, match="SGLang could not load weights"):
            client.update_weights(tmp_path / "nowhere")
    with pytest.raises(AdapterError, match="restart"):
        AdapterClient("http://127.0.0.1:9", engine="vllm").update_weights(full)


@pytest.mark.slow
def test_flattened_chain_equals_the_stacked_adapters(tmp_path, tiny_model_dir):
    """Round 1 trains a fresh LoRA on round 0's merged model; the flattened adapter on the base must give
    the same logits as loading the chain the way opsd does (opsd.io.models.load merges round by round)."""
    from peft import LoraConfig, get_peft_model

    from opsd.io import models

    def train_like(base_dir: str, dest: Path, seed: int) -> Path:
        lm, tok = models.load(base_dir, device="cpu")
        torch.manual_seed(seed)
        peft = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                             init_lora_weights=False))
        peft.save_pretrained(dest)
        tok.save_pretrained(dest)  # as opsd train saves it
        meta = json.loads((dest / "adapter_config.json").read_text())
        meta["base_model_name_or_path"] = str(Path(base_dir).resolve())
        (dest / "adapter_config.json").write_text(json.dumps(meta))
        return dest

    a0 = train_like(str(tiny_model_dir), tmp_path / "round_0", seed=1)
    a1 = train_like(str(a0), tmp_path / "round_1", seed=2)
    chain, base = adapter_chain(a1)
    assert chain == [a0, a1] and Path(base) == Path(tiny_model_dir).resolve()
    flat = flatten_adapters(chain, base, tmp_path / "flat")
    assert json.loads((flat / "adapter_config.json").read_text())["r"] == 8
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    stacked, _ = models.load(str(a1), device="cpu")
    flat_lm, _ = models.load(str(flat), device="cpu")
    base_lm, _ = models.load(str(tiny_model_dir), device="cpu")
    with torch.no_grad():
        want, got, plain = (m(ids).logits for m in (stacked, flat_lm, base_lm))
    assert (want - plain).abs().max() > 1e-3  # the adapters do change the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
