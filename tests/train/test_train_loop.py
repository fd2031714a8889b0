"""The training loop on a tiny random Llama: config mapping, teacher modes, resume, NaN stop, vocab check.

The plumbing runs in fp32 (`precision="fp32"`), where equalities are exact; bf16 has its own test.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opsd.io.models import load
from opsd.train import run as train
from opsd.train import step as train_step
from opsd.config import parse as parse_config
from opsd.train.config import TrainConfig
from opsd.train.losses import TopK
from opsd.train.scoring import span_logits
from tests.conftest import CRITIQUES, TRAJECTORIES, save_tiny


def cfg_for(model_dir, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), trajectories=str(TRAJECTORIES), critiques=str(CRITIQUES), out=str(out),
                min_hint_effect=float("-inf"), max_steps=3, batch_size=2, lr=1e-3, progress=False, seed=3,
                precision="fp32")
    return TrainConfig(**{**base, **kw})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def parse(argv):
    return parse_config(TrainConfig, argv, prog="opsd train")


def test_flags_and_yaml_map_onto_config(tmp_path, capsys):
    y = tmp_path / "cfg.yaml"
    y.write_text(yaml.safe_dump({"lr": 3e-4, "lora_r": 8, "teacher": "initial", "min_hint_effect": "-inf"}))
    cfg = parse(["--config", str(y), "--lr", "1e-4", "--no-progress", "--span", "step"])
    assert (cfg.lr, cfg.lora_r, cfg.teacher, cfg.progress, cfg.span) == (1e-4, 8, "initial", False, "step")
    assert cfg.min_hint_effect == float("-inf") and cfg.beta == 0.5  # YAML, then default
    assert yaml.safe_load(cfg.to_yaml())["lora_r"] == 8  # config.yaml round-trips through YAML
    assert TrainConfig(**yaml.safe_load(cfg.to_yaml())) == cfg
    y.write_text("lerning_rate: 1\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(y)])
    assert "unknown key 'lerning_rate'" in capsys.readouterr().err
    for bad, msg in [({"precompute_targets": "maybe"}, "auto, yes or no"), ({"teacher": "external"}, "teacher-model"),
                     ({"placement": "inline", "span": "step"}, "inline"), ({"beta": 1.5}, "beta"),
                     ({"precompute_targets": True, "teacher": "self"}, "fixed teacher"), ({"precision": "fp16"}, "precision")]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**bad)


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
def test_teacher_modes_run(tiny_dir, tmp_path, smol_tok, mode):
    kw = {"initial_lora": dict(teacher="initial", lora_r=4),
          "initial_precompute": dict(teacher="initial", top_k=16),  # precompute_targets=auto: no LoRA -> precomputed
          "ema": dict(teacher="ema", ema_decay=0.5),
          "external": dict(teacher="external", teacher_model=str(save_tiny(tmp_path / "ext", smol_tok, seed=9))),
          "reverse_topk": dict(teacher="external", teacher_model=str(tiny_dir), precompute_targets="yes", top_k=8,
                               loss="reverse_kl", temperature=2.0)}[mode]
    out = tmp_path / "run"
    train.main(cfg_for(tiny_dir, out, **kw))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    assert len(rows) == 3 and all(math.isfinite(r["train/loss"]) for r in rows)
    recs = [json.loads(l) for l in (out / "examples.jsonl").read_text().splitlines()]
    precomputed = mode in ("initial_precompute", "reverse_topk")
    assert all(("teacher_topk_ids" in r) == precomputed for r in recs)
    if precomputed:
        k = kw["top_k"]
        assert all(len(r["teacher_topk_ids"]) == r["student_span"][1] - r["student_span"][0] for r in recs)
        assert all(len(row) == k for r in recs for row in r["teacher_topk_ids"])
        # the exact teacher log-prob of every target token and the exact tail mass are stored too
        assert all(len(r["teacher_target_logprobs"]) == len(r["teacher_topk_tail_logprobs"]) == len(r["teacher_topk_ids"])
                   for r in recs)
        assert all(math.isfinite(r["teacher/hint_effect"]) for r in rows)
    if mode == "initial_lora":
        cfg = json.loads((out / "model" / "adapter_config.json").read_text())
        assert Path(cfg["base_model_name_or_path"]) == Path(tiny_dir).resolve()
        m, _ = load(out / "model", device="cpu")  # adapter merged onto its base
        assert m.config.vocab_size == len(smol_tok)


def one_step(tiny_dir, out, **kw):
    """The run's stages up to one optimizer step; returns the state and a micro-batch of its first records."""
    cfg = cfg_for(tiny_dir, out, lr=5e-2, **kw)
    out.mkdir(parents=True)
    s = train.setup(cfg)
    records, _ = train.data_sources(cfg, s, out)
    state = train.start(cfg, s, records)
    mb = train_step.make_micro_batch(records[:3], state.pad_id)
    before = train_step.targets(state.teacher, mb)
    train_step.train_step(state, 0)
    return state, mb, before


def logits_of(lm, batch):
    with torch.no_grad():
        return span_logits(lm.eval(), batch.input_ids, batch.attention_mask, batch.batch_idx, batch.pos)


@pytest.mark.parametrize("mode", ["self", "initial_lora", "initial_precompute", "ema", "external"])
def test_each_teacher_mode_reads_its_own_weights(tiny_dir, tmp_path, smol_tok, mode):
    """After one update, each teacher's targets are exactly those of the weights it names (and no other's)."""
    ext = save_tiny(tmp_path / "ext", smol_tok, seed=9)
    kw = {"self": dict(teacher="self"), "initial_lora": dict(teacher="initial", lora_r=4),
          "initial_precompute": dict(teacher="initial"), "ema": dict(teacher="ema", ema_decay=0.5),
          "external": dict(teacher="external", teacher_model=str(ext))}[mode]
    state, mb, before = one_step(tiny_dir, tmp_path / "run", **kw)
    start_lm, _ = load(tiny_dir, device="cpu")
    start = logits_of(start_lm, mb.teacher)
    live = logits_of(state.student.lm, mb.teacher)
    assert (live - start).abs().max() > 1e-2  # the step moved the student
    if mode == "initial_precompute":  # the targets were precomputed from the start; no teacher is kept
        assert state.teacher is None and isinstance(before, TopK)
        top_lp, top_ids = torch.log_softmax(start, -1).topk(before.ids_NK.shape[-1], -1)
        assert torch.equal(before.ids_NK, top_ids)
        torch.testing.assert_close(before.logprobs_NK, top_lp, atol=1e-5, rtol=0)
        return
    after = train_step.targets(state.teacher, mb).logits_NV
    want = {"self": live, "initial_lora": start, "external": logits_of(load(ext, device="cpu")[0], mb.teacher)}.get(mode)
    if mode == "ema":  # one update with decay 0.5: the mean of the start and the current weights
        cur = dict(state.student.lm.named_parameters())
        with torch.no_grad():
            for n, p in start_lm.named_parameters():
                p.lerp_(cur[n].detach(), 0.5)
        want = logits_of(start_lm, mb.teacher)
        assert (after - start).abs().max() > 1e-3 and (after - live).abs().max() > 1e-3
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-5)
    moved = (after - before.logits_NV).abs().max()
    assert (moved > 1e-3) == (mode in ("self", "ema")), moved  # only self and ema follow the student


def test_initial_teacher_without_lora_cold_start_samples_come_from_the_start(tiny_dir, tmp_path):
    """--teacher initial, no LoRA, --cold-start-sft 2: the 2nd cold-start step's teacher samples are the frozen
    start's continuations, not the partly trained student's (bug: the teacher wrapped the live module)."""
    from opsd.train import sources

    state, _, _ = one_step(tiny_dir, tmp_path / "run", teacher="initial", cold_start_sft=2, gen_temperature=0.0,
                           max_new_tokens=8)
    assert state.teacher is not None and state.teacher.name == "initial"
    data = train_step.draw(state, 1)  # step 2: cold start, after one update
    assert data.source == "sft"
    recs = [r for m in data.micro for r in m]
    drawn = [state.records[i] for i in train_step.step_batches(len(state.records), 1, state.cfg, 0, 1)[0][0]]
    prompts = [r.prefixes()[1] for r in drawn]  # the hinted teacher continues from the error
    start_lm, tok = load(tiny_dir, device="cpu")
    from_start = sources.sample_replies(start_lm, tok, prompts, max_new_tokens=8, temperature=0.0, seed=0)
    from_live = sources.sample_replies(state.student.lm, tok, prompts, max_new_tokens=8, temperature=0.0, seed=0)
    got = [r.student_ids[r.student_span[0]:r.student_span[1]] for r in recs]
    assert from_live != from_start  # the update changed what the student writes: the test can tell them apart
    assert got == from_start


def test_initial_lora_teacher_is_the_frozen_start(smol_tok, trajectories, critiques):
    """teacher=initial with LoRA: adapters disabled gives exactly the starting weights, at no extra copy."""
    from peft import LoraConfig, get_peft_model

    from opsd.hint.build import build_examples
    from opsd.train.scoring import collate, span_logits
    from accelerate import Accelerator

    from opsd.train.student import Student
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
    student = Student(lm, Accelerator(cpu=True))
    initial, current = make_teacher("initial", student, lora=True), make_teacher("self", student, lora=True)
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
    assert loss(full.parent) == loss(out)  # step 3, logged before the crash, was dropped on resume and logged again
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), steps


def _kill_while_writing(monkeypatch, step: int):
    """Accelerator.save_state writes checkpoint `step` and then the process is 'killed' (KeyboardInterrupt), before
    the checkpoint gets its trainer_state.json and its final name."""
    from accelerate import Accelerator

    real = Accelerator.save_state

    def save_state(self, output_dir=None, **kw):
        out = real(self, output_dir, **kw)
        if str(output_dir).endswith(f"step-{step:06d}.tmp"):
            raise KeyboardInterrupt
        return out
    monkeypatch.setattr(Accelerator, "save_state", save_state)


def _steps(run: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_kill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tiny_dir, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    _kill_while_writing(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train.main(cfg_for(tiny_dir, out, max_steps=4, save_every=1))
    monkeypatch.undo()
    assert (out / "checkpoints" / "step-000003.tmp").is_dir() and _steps(out) == [0, 1, 2, 3]
    with caplog.at_level("WARNING", logger="opsd.train.checkpoints"):
        train.main(cfg_for(tiny_dir, out, max_steps=4, save_every=1, resume=True))
    assert "step-000003.tmp" in caplog.text and "resuming from step-000002" in caplog.text
    assert _steps(out) == [0, 1, 2, 3, 4]  # step 3 once: the row the killed run logged was dropped
    assert (out / "model").is_dir()


def test_kill_while_writing_the_first_checkpoint_restarts_from_0_loudly(tiny_dir, tmp_path, monkeypatch, caplog):
    """No complete checkpoint: the resumed run starts over, says so, and metrics.jsonl does not hold steps twice."""
    out = tmp_path / "run"
    _kill_while_writing(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train.main(cfg_for(tiny_dir, out, max_steps=3, save_every=2))
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="opsd.train.checkpoints"):
        train.main(cfg_for(tiny_dir, out, max_steps=3, save_every=2, resume=True))
    assert "no complete checkpoint: starting again from step 0" in caplog.text
    assert _steps(out) == [0, 1, 2, 3]


def test_an_interrupted_train_says_to_rerun_with_resume(monkeypatch, capsys):
    from opsd import cli

    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "train", (cli.COMMANDS["train"][0], interrupted))
    assert cli.main(["train", "--out", "x"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_nonfinite_gradient_stops_with_clipping_off(tiny_dir, tmp_path, monkeypatch):
    """A finite loss with a NaN gradient, max_grad_norm=0: the run stops before the update (it used to step)."""
    real_loss = train_step.loss

    def nan_gradient_loss(student, mb, tgt, cfg, **kw):
        obj, stats = real_loss(student, mb, tgt, cfg, **kw)
        zero = obj * 0.0
        return obj + zero.abs().sqrt(), stats  # value + 0, gradient 0 * inf = NaN
    monkeypatch.setattr(train_step, "loss", nan_gradient_loss)
    out = tmp_path / "run"
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss [-0-9.e]+ \(grad norm nan\) at step 1"):
        train.main(cfg_for(tiny_dir, out, max_grad_norm=0))
    assert not (out / "model").exists()


def test_nonfinite_loss_stops_with_last_good_checkpoint(tiny_dir, tmp_path):
    """lr 1e30, clipping off: step 1's update blows the weights up. Step 2's loss is still finite but its gradient
    is NaN: the run stops there (before the guard saw gradients with clipping off, it stepped and stopped at 3)."""
    out = tmp_path / "run"
    with pytest.raises(train.NonFiniteLossError, match=r"\(grad norm nan\) at step 2; .*Last good checkpoint: .*step-000001"):
        train.main(cfg_for(tiny_dir, out, lr=1e30, max_grad_norm=0, max_steps=4, save_every=1, loss="forward_kl",
                           schedule="constant"))
    assert (out / "checkpoints" / "step-000001").exists() and not (out / "checkpoints" / "step-000002").exists()
    assert not (out / "model").exists()


def test_external_teacher_vocab_mismatch(tiny_dir, tmp_path, smol_tok):
    ext = save_tiny(tmp_path / "small_vocab", smol_tok, vocab_size=1000)
    with pytest.raises(ValueError, match=r"vocab size 1000 != student vocab size 49152"):
        train.main(cfg_for(tiny_dir, tmp_path / "run", teacher="external", teacher_model=str(ext)))


def test_python_m_opsd_train_is_the_cli():
    """`python -m opsd.train` (what `accelerate launch -m opsd.train` runs) is `opsd train`, GKD+RL reward included."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "opsd.train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--precompute-targets" in r.stdout and "--rl-alpha" in r.stdout and "--precision" in r.stdout
