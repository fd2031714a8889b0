"""The training loop on a tiny random Llama: config mapping, teacher modes, resume, NaN stop, vocab check."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opsd.train import run as train
from opsd.train.config import TrainConfig, add_config_arguments, config_from_args
from tests.conftest import CRITIQUES, TRAJECTORIES, save_tiny


def cfg_for(model_dir, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), trajectories=str(TRAJECTORIES), critiques=str(CRITIQUES), out=str(out),
                min_hint_effect=float("-inf"), max_steps=3, batch_size=2, lr=1e-3, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_flags_and_yaml_map_onto_config(tmp_path):
    y = tmp_path / "cfg.yaml"
    y.write_text(yaml.safe_dump({"lr": 3e-4, "lora_r": 8, "teacher": "initial", "min_hint_effect": "-inf"}))
    cfg = parse(["--config", str(y), "--lr", "1e-4", "--no-progress", "--span", "step"])
    assert (cfg.lr, cfg.lora_r, cfg.teacher, cfg.progress, cfg.span) == (1e-4, 8, "initial", False, "step")
    assert cfg.min_hint_effect == float("-inf") and cfg.beta == 0.5  # YAML, then default
    assert yaml.safe_load(cfg.to_yaml())["lora_r"] == 8  # config.yaml round-trips through YAML
    assert TrainConfig(**yaml.safe_load(cfg.to_yaml())) == cfg
    y.write_text("lerning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        parse(["--config", str(y)])
    for bad, msg in [({"teacher": "initial"}, "precompute"), ({"teacher": "external"}, "teacher-model"),
                     ({"placement": "inline", "span": "step"}, "inline"), ({"beta": 1.5}, "beta"),
                     ({"precompute_targets": True}, "fixed teacher")]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**bad)


def test_every_field_has_a_flag_with_help():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    helps = {a.dest: a.help for a in p._actions}
    for f in TrainConfig.__dataclass_fields__:
        assert f in helps and len(helps[f]) > 20, f


def test_run_folder_and_metrics(tiny_dir, tmp_path):
    out = tmp_path / "run"
    dest = train.main(cfg_for(tiny_dir, out, save_every=2))
    assert dest == out / "model"
    assert {p.name for p in out.iterdir()} >= {"model", "config.yaml", "metrics.jsonl", "checkpoints", "examples.jsonl", "data.json"}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["data/kept"] == 6 and rows[0]["data/skipped_verdict_ok"] == 2
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["train/span_tokens"] > 0 and r["train/loss"] >= 0 and "teacher/hint_effect" in r
    from opsd.io.models import load
    m, _ = load(dest, device="cpu")
    assert torch.equal(m.model.embed_tokens.weight, weights(out)["model.embed_tokens.weight"])
    assert TrainConfig(**yaml.safe_load((out / "config.yaml").read_text())).max_steps == 3


@pytest.mark.parametrize("mode", ["initial_lora", "initial_precompute", "ema", "external", "reverse_topk"])
def test_teacher_modes(tiny_dir, tmp_path, smol_tok, mode):
    kw = {"initial_lora": dict(teacher="initial", lora_r=4),
          "initial_precompute": dict(teacher="initial", precompute_targets=True, top_k=16),
          "ema": dict(teacher="ema", ema_decay=0.5),
          "external": dict(teacher="external", teacher_model=str(save_tiny(tmp_path / "ext", smol_tok, seed=9))),
          "reverse_topk": dict(teacher="external", teacher_model=str(tiny_dir), precompute_targets=True, top_k=8,
                               loss="reverse_kl", temperature=2.0)}[mode]
    out = tmp_path / "run"
    train.main(cfg_for(tiny_dir, out, **kw))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    assert len(rows) == 3 and all(r["train/loss"] >= 0 for r in rows)
    recs = [json.loads(l) for l in (out / "examples.jsonl").read_text().splitlines()]
    if "precompute" in mode or mode == "reverse_topk":
        k = kw["top_k"]
        assert all(len(r["teacher_topk_ids"]) == r["student_span"][1] - r["student_span"][0] for r in recs)
        assert all(len(row) == k for r in recs for row in r["teacher_topk_ids"])
        # the exact teacher log-prob of every target token is stored too, so the hint effect is logged
        assert all(len(r["teacher_target_logprobs"]) == len(r["teacher_topk_ids"]) for r in recs)
        assert all(math.isfinite(r["teacher/hint_effect"]) for r in rows)
    if mode == "initial_lora":
        cfg = json.loads((out / "model" / "adapter_config.json").read_text())
        assert Path(cfg["base_model_name_or_path"]) == Path(tiny_dir).resolve()
        from opsd.io.models import load
        m, _ = load(out / "model", device="cpu")  # adapter merged onto its base
        assert m.config.vocab_size == len(smol_tok)


def test_initial_lora_teacher_is_the_frozen_start(smol_tok, trajectories, critiques):
    """teacher=initial with LoRA: adapters disabled gives exactly the starting weights, at no extra copy."""
    from peft import LoraConfig, get_peft_model

    from opsd.hint.build import build_examples
    from opsd.train.scoring import collate, span_logits
    from opsd.train.teachers import make_teacher
    from tests.conftest import tiny_llama

    exs, _ = build_examples(trajectories, critiques, smol_tok)
    b = collate([e.teacher_ids for e in exs], [e.teacher_span for e in exs], pad_id=2)
    base = tiny_llama(len(smol_tok), seed=5)
    with torch.no_grad():
        want = span_logits(base, b.input_ids, b.attention_mask, b.batch_idx, b.pos)
    lm = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).train()
    for n, p in lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # as if trained
    initial, current = make_teacher("initial", lm, lora=True), make_teacher("self", lm, lora=True)
    torch.testing.assert_close(initial.logits(b), want, atol=1e-6, rtol=1e-6)
    assert (current.logits(b) - want).abs().max() > 1e-3
    assert lm.training  # the teacher pass restores the mode


def test_grad_accum_equals_bigger_batch(tiny_dir, tmp_path):
    a = train.main(cfg_for(tiny_dir, tmp_path / "a", batch_size=4, grad_accum=1))
    b = train.main(cfg_for(tiny_dir, tmp_path / "b", batch_size=2, grad_accum=2))
    wa, wb = weights(a.parent), weights(b.parent)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-5)
    c = train.main(cfg_for(tiny_dir, tmp_path / "c", batch_size=4, seed=4))  # other data order: other weights
    assert not torch.equal(wa["model.norm.weight"], weights(c.parent)["model.norm.weight"])


def test_kill_and_resume_is_identical(tiny_dir, tmp_path):
    full = train.main(cfg_for(tiny_dir, tmp_path / "full", max_steps=4, save_every=2))

    class Killed(Exception):
        pass

    def crash(step, values):
        if step == 3:
            raise Killed  # dies after step 3, before any step-3 checkpoint: the step-2 one is the last good one
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train.main(cfg_for(tiny_dir, out, max_steps=4, save_every=2), on_step=crash)
    assert not (out / "model").exists() and (out / "checkpoints" / "step-000002").exists()
    train.main(cfg_for(tiny_dir, out, max_steps=4, save_every=2, resume=True))
    wf, wr = weights(full.parent), weights(out)
    for k in wf:
        assert torch.equal(wf[k], wr[k]), k
    loss = lambda run: [json.loads(l)["train/loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    assert loss(full.parent) == loss(out)[:2] + loss(out)[3:]  # step 3 was logged twice (before and after the crash)


def test_nonfinite_loss_stops_with_last_good_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(train.NonFiniteLossError, match=r"at step 3; .*Last good checkpoint: .*step-000002"):
        train.main(cfg_for(tiny_dir, out, lr=1e30, max_grad_norm=0, max_steps=4, save_every=1, loss="forward_kl",
                           schedule="constant"))
    assert (out / "checkpoints" / "step-000002").exists() and not (out / "checkpoints" / "step-000003").exists()
    assert not (out / "model").exists()


def test_external_teacher_vocab_mismatch(tiny_dir, tmp_path, smol_tok):
    ext = save_tiny(tmp_path / "small_vocab", smol_tok, vocab_size=1000)
    with pytest.raises(ValueError, match=r"vocab size 1000 != student vocab size 49152"):
        train.main(cfg_for(tiny_dir, tmp_path / "run", teacher="external", teacher_model=str(ext)))
