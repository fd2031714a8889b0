"""Runs that reuse what is on disk reuse only what the new run would compute (issue 22 item 7).

`trained()` keys on the training config AND the content of its input files and starting weights; `opsd compare`
keeps its shared rollouts and critiques in a file per rollout config, so a rerun into the same --out with
other settings neither reuses the old models nor trains on a file that mixes both runs' lines.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from opsd.io.records import read_jsonl
from opsd.pipelines import compare, loop
from opsd.train.config import TrainConfig


def _fake_train(calls: list):
    def train_main(tcfg: TrainConfig) -> Path:
        calls.append({"resume": tcfg.resume, "data": Path(tcfg.trajectories[0]).read_text()})
        model = Path(tcfg.out) / "model"
        model.mkdir(parents=True, exist_ok=True)
        (model / "config.json").write_text("{}")
        return model
    return train_main


def test_trained_reruns_when_an_input_file_changes_under_the_same_path(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(loop, "train_main", _fake_train(calls))
    trajs, crits, out = tmp_path / "rollouts.jsonl", tmp_path / "critiques.jsonl", tmp_path / "train"
    trajs.write_text("run 1\n")
    crits.write_text("critiques 1\n")
    tcfg = TrainConfig(mode="opsd", trajectories=str(trajs), critiques=str(crits), out=str(out), resume=True)
    marker = out / "done.json"
    first = loop.trained(tcfg, marker)
    assert loop.trained(tcfg, marker) == first and len(calls) == 1  # same config, same inputs: reused
    trajs.write_text("run 2: other rollouts, same path\n")
    (out / "checkpoints" / "step-000008").mkdir(parents=True)  # the finished run's last checkpoint
    loop.trained(tcfg, marker)
    assert len(calls) == 2 and calls[1] == {"resume": False, "data": "run 2: other rollouts, same path\n"}
    assert not (out / "checkpoints").exists()  # never resumed from the other inputs' checkpoint
    loop.trained(tcfg, marker)
    assert len(calls) == 2
    crits.write_text("critiques 2\n")
    loop.trained(tcfg, marker)
    assert len(calls) == 3
    marker.unlink()  # a run killed after it started: the rerun resumes its own checkpoints
    loop.trained(tcfg, marker)
    assert len(calls) == 4 and calls[3]["resume"] is True


def test_compare_rerun_with_more_samples_neither_reuses_nor_mixes(tiny_model_dir, tmp_path, monkeypatch):
    """`--samples 4`, then `--samples 8`, then another temperature, into the same --out: each run's training files
    hold exactly its own replies (unique ids, every one critiqued once) and its trainings get other keys."""
    seen: list[dict] = []

    def run_method(cfg, method, data, *a, **k):
        seen.append({"method": method, "data": data, "key": loop.training_key(
            compare.train_config(cfg, data, cfg.lr_list[0], Path(cfg.out) / method / "lr"))})
        return {"method": method, "status": "no training data", "reason": "test"}

    monkeypatch.setattr(compare, "run_method", run_method)
    monkeypatch.setattr(compare, "heldout", lambda *a, **k: {"n": 0, "tasks": "", "rows": {}})
    for name in ("format_compare", "format_tradeoff"):
        monkeypatch.setattr(compare, name, lambda result: "")
    monkeypatch.setattr(compare, "tradeoff_plot", lambda result, path: None)
    train = dataclasses.replace(compare._compare_train(), model=str(tiny_model_dir), precision="fp32")
    base = compare.CompareConfig(out=str(tmp_path / "cmp"), methods="opsd", limit=2, samples=4, validation_limit=1,
                                 heldout_limit=1, max_new_tokens=4, prefill="<tool_call>\n", forgetting_prompts=0,
                                 train=train)
    runs = [base, dataclasses.replace(base, samples=8), dataclasses.replace(base, samples=8, temperature=0.5)]
    for cfg in runs:
        compare.run_one(cfg, echo=lambda s: None)
    assert len(seen) == 3
    for cfg, rec in zip(runs, seen):
        rows = list(read_jsonl(rec["data"]["trajectories"]))
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) == cfg.limit * cfg.samples, (cfg.samples, cfg.temperature, len(ids))
        crit_ids = [json.loads(x)["trajectory_id"] for x in open(rec["data"]["critiques"])]
        assert sorted(crit_ids) == sorted(ids)
    assert len({r["data"]["trajectories"] for r in seen}) == len({r["data"]["critiques"] for r in seen}) == 3
    assert len({r["key"] for r in seen}) == 3  # no training of one run is reused by another


def test_a_training_option_added_later_keeps_the_keys_of_runs_without_it(tmp_path):
    """`--anchor` came after runs were cached: off (0), the key is what it was before the field existed, so those
    runs are reused; on, it is another run."""
    tcfg = TrainConfig(mode="opsd", trajectories=str(tmp_path / "t.jsonl"), critiques=str(tmp_path / "c.jsonl"))
    assert "anchor" in dataclasses.asdict(tcfg)
    old = dict(dataclasses.asdict(tcfg))
    del old["anchor"]
    before = loop.content_hash({"config": old, "inputs": {str(tmp_path / "t.jsonl"): "missing",
                                                          str(tmp_path / "c.jsonl"): "missing"}, "models": {
        "smollm2-135m-instruct": loop.fingerprint("smollm2-135m-instruct")}})
    assert loop.training_key(tcfg) == before
    assert loop.training_key(dataclasses.replace(tcfg, anchor=0.1)) != before


def test_the_cold_start_key_ignores_options_only_the_rounds_read(tmp_path):
    """The cold start is SFT: a round option (--train.anchor, --train.loss, ...) must keep its training key, so a
    sweep over round options reuses it instead of retraining it; what SFT reads (batch, seed, LoRA) changes it."""
    from opsd.pipelines.cold_start import cold_start_config
    from opsd.pipelines.loop import _loop_train

    def key(**changes):
        train = dataclasses.replace(_loop_train(), **changes)
        return loop.training_key(cold_start_config(train, model="smollm2-135m-instruct", data=str(tmp_path / "gt.jsonl"),
                                                   out=tmp_path / "train", steps=8, lr=3e-5))
    base = key()
    assert key(anchor=0.1) == key(loss="forward_kl") == key(span="step", min_hint_effect=1.0) == base
    assert key(batch_size=4) != base and key(seed=1) != base and key(lora_r=8) != base
