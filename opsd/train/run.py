"""`opsd train`: targeted on-policy self-distillation (OPSD) or GKD, in an explicit accelerate loop.

    opsd train --trajectories data/sample_openai.jsonl --critiques data/sample_critiques.jsonl \\
        --out runs/demo --max-steps 8 --lr 5e-5                                   # OPSD, frozen initial teacher
    opsd train --trajectories data/sample_openai.jsonl --out runs/gkd --teacher external \\
        --teacher-model TEACHER_DIR --lmbda 0.5 --max-steps 8                    # GKD (no critiques)
    accelerate launch --multi_gpu --num_processes 2 -m opsd.train --cpu ...      # DDP (--cpu: gloo on CPU)

`main(cfg)` reads as its stages:

1. `setup`: accelerator (precision), the student (LoRA, gradient checkpointing) and the teacher;
2. `data_sources`: OPSD hinted examples with their hint effect (and precomputed top-k targets),
   or GKD prompt/reply records (`opsd.train.sources`), saved as OUT/examples.jsonl, counts in
   OUT/data.json (a resumed run reuses them);
3. `start`: optimizer, schedule, distribution (`accelerate.prepare`), the teacher the loop needs;
4. for each step (`opsd.train.step`): draw -> targets -> loss -> accumulate -> optimizer step,
   then log (metrics.jsonl, `diag/*`) and checkpoint; a NaN/inf loss or gradient stops the run;
5. `save`: OUT/model (full weights or the LoRA adapter, plus the generation settings).
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from opsd.io import models
from opsd.io.records import read_jsonl
from opsd.train import sources
from opsd.train.checkpoints import (
    Metrics,
    latest_checkpoint,
    save_checkpoint,
    save_model,
)
from opsd.train.config import TrainConfig
from opsd.train.records import TrainRecord
from opsd.train.step import NonFiniteLossError, TrainState, train_step
from opsd.train.student import Student, check_launch, check_launch_env, load_student
from opsd.train.teachers import Teacher, check_same_vocab, make_teacher

log = logging.getLogger("opsd.train")
__all__ = ["NonFiniteLossError", "data_sources", "main", "save", "setup", "start"]


# ---------------------------------------------------------------- 1. setup

@dataclass
class Setup:
    accelerator: Accelerator
    student: Student
    tok: object
    teacher: Teacher


def train_precision(cfg: TrainConfig, device: str) -> str:
    """"fp32" or "bf16" for this run on `device`: `cfg.precision`, where `auto` is bf16 on hardware with bf16 units,
    except for GKD, which trains in fp32 under `auto` on every device."""
    if cfg.precision == "auto" and cfg.is_gkd:
        # measured on CPU (tests/train/test_gkd_real_model.py): context distillation of the real model, JSD 0.004 at
        # the start, fell to 0.0026 in 3 fp32 steps but rose to 0.0094 under bf16 autocast. The cause is numeric, not
        # the device's: bf16 keeps 8 mantissa bits on a GPU as on a CPU, and the rounding noise in the gradients of a
        # near-converged divergence is what Adam turns into full-size steps. OPSD's hinted targets are far apart
        # (hint effects of nats) and train well under bf16
        return "fp32"
    return models.resolve_precision(cfg.precision, device)


def setup_accelerator(cfg: TrainConfig) -> Accelerator:
    """The accelerator: bf16 autocast when the precision resolves to bf16, fp32 otherwise; trackers; seeds."""
    device = "cpu" if cfg.cpu or not torch.cuda.is_available() else "cuda"
    precision = train_precision(cfg, device)
    check_launch_env(device)
    trackers = [t.strip() for t in cfg.report_to.split(",") if t.strip()] or None
    # every main(cfg) is a run of its own, whose precision may differ from an earlier run's in this process;
    # accelerate keeps one global state and refuses a change, so it is reset (the process group is kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(cpu=cfg.cpu, mixed_precision="bf16" if precision == "bf16" else "no", log_with=trackers,
                      project_dir=cfg.out or None)
    check_launch(acc)
    set_seed(cfg.seed)
    return acc


def load_teacher(cfg: TrainConfig, student: Student, tok) -> Teacher:
    """The teacher of `cfg.teacher`, built before the first update (a frozen copy only where the loop needs one)."""
    external = None
    if cfg.teacher == "external":
        external, ext_tok = models.load(cfg.teacher_model, device=str(student.accelerator.device), dtype=torch.float32)
        check_same_vocab(student.lm, external, tok, ext_tok)
    return make_teacher(cfg.teacher, student, lora=cfg.lora_r > 0, frozen_copy=cfg.initial_copy,
                        ema_decay=cfg.ema_decay, external_lm=external)


def setup(cfg: TrainConfig) -> Setup:
    accelerator = setup_accelerator(cfg)
    lm, tok = load_student(cfg, accelerator.device)
    student = Student(lm, accelerator)
    log.info("distributed: world=%d rank=%d device=%s precision=%s teacher=%s", accelerator.num_processes,
             accelerator.process_index, accelerator.device, accelerator.mixed_precision, cfg.teacher)
    return Setup(accelerator, student, tok, load_teacher(cfg, student, tok))


# ---------------------------------------------------------------- 2. data sources

def data_sources(cfg: TrainConfig, s: Setup, out: Path, *, reuse: bool = False) -> tuple[list[TrainRecord], dict]:
    """The run's records and their counts: built (OPSD or GKD, see `opsd.train.sources`), or reused from OUT."""
    acc = s.accelerator
    if reuse and (out / "examples.jsonl").exists():
        return [TrainRecord.from_dict(d) for d in read_jsonl(out / "examples.jsonl")], json.loads((out / "data.json").read_text())
    with acc.autocast():
        if cfg.is_supervised:
            records, report = sources.build_supervised(cfg, s.tok)
        elif cfg.is_gkd:
            records, report = sources.build_gkd(cfg, s.tok, s.student.lm, s.teacher)
        else:
            records, report = sources.build_opsd(cfg, s.tok, s.student.lm, s.teacher, rank=acc.process_index,
                                                 world=acc.num_processes, gather=gather_object)
    if acc.is_main_process:
        (out / "examples.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
        (out / "data.json").write_text(json.dumps(report, indent=2))
    log.info("%s examples: %s", cfg.mode if cfg.is_supervised else "GKD" if cfg.is_gkd else "OPSD", json.dumps(report))
    if cfg.is_gkd and cfg.teacher in ("self", "initial") and not cfg.teacher_system and cfg.rl_alpha == 1.0:
        log.warning("GKD with the student as its own teacher and no --teacher-system: the loss is 0")
    if not records:
        raise RuntimeError(f"no usable examples ({json.dumps(report)}); check the critiques, or lower --min-hint-effect")
    return records, report


# ---------------------------------------------------------------- 3. optimizer, schedule, distribution

def lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.schedule]
    return f


def total_steps(cfg: TrainConfig, n_examples: int, world: int) -> int:
    """Optimizer steps of the run: the cold start plus max_steps, or epochs over the examples."""
    main_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n_examples / (cfg.batch_size * world * cfg.grad_accum)))
    return cfg.cold_start_sft + main_steps


def start(cfg: TrainConfig, s: Setup, records: list[TrainRecord], *, reward_fn=None) -> TrainState:
    """AdamW over the trainable weights (fp32 state), the LR schedule, the prepared student, the loop's teacher."""
    acc = s.accelerator
    steps = total_steps(cfg, len(records), acc.num_processes)
    params = [p for p in s.student.lm.parameters() if p.requires_grad]
    # fused: one vectorised kernel over all weights instead of ~10 ops per tensor (CPU and CUDA, fp32 weights);
    # what HF Trainer (and so TRL) uses by default
    fused = bool(params) and all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    optimizer = s.student.prepare(optimizer)
    acc.register_for_checkpointing(scheduler)  # not prepared: accelerate would step it once per process
    teacher = s.teacher if cfg.teacher_in_loop else None  # precomputed targets: an external teacher's weights can go
    if teacher is not None and teacher.name == "ema":
        acc.register_for_checkpointing(teacher.lm)
    return TrainState(cfg, acc, s.student, teacher, s.tok, records, optimizer, scheduler, steps, reward_fn)


# ---------------------------------------------------------------- 5. save

def save(state: TrainState, out: Path) -> Path:
    """OUT/model on the main process (and a final checkpoint when checkpointing), then end the run."""
    acc, cfg = state.accelerator, state.cfg
    acc.wait_for_everyone()
    dest = out / "model"
    if acc.is_main_process:
        dest = save_model(acc.unwrap_model(state.student.span_lm).lm, state.tok, out, source_model=cfg.model)
    if cfg.save_every:  # a final checkpoint lets a later run with more --max-steps continue
        save_checkpoint(acc, out, state.steps, cfg.keep_checkpoints)
    acc.end_training()
    return dest


# ---------------------------------------------------------------- main

def main(cfg: TrainConfig, *, on_step=None, reward_fn: sources.RewardFn | None = None) -> Path:
    """Train and return OUT/model. `on_step(step, metrics)` is called after every optimizer step.

    `reward_fn(trajectories) -> rewards` is needed for GKD+RL (rl_alpha < 1); `opsd train` builds it
    from a critic, since this core never imports `opsd_critic`.
    """
    if cfg.rl_alpha < 1.0 and reward_fn is None:
        raise ValueError("rl_alpha < 1 (GKD+RL) needs a reward function: main(cfg, reward_fn=...)")
    out = Path(cfg.out)
    s = setup(cfg)
    if s.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    resume_from = latest_checkpoint(out) if cfg.resume else None
    records, report = data_sources(cfg, s, out, reuse=resume_from is not None)
    state = start(cfg, s, records, reward_fn=reward_fn)
    first = 0
    if resume_from is not None:
        state.accelerator.load_state(str(resume_from))
        first = json.loads((resume_from / "trainer_state.json").read_text())["step"]
        s.teacher.resumed(first)
        log.info("resumed from %s at step %d", resume_from, first)
    metrics = Metrics(state.accelerator, out / "metrics.jsonl", asdict(cfg), resume_step=first)
    if first == 0:
        metrics.log(0, data_metrics(report))
    state.sources = Counter(sources.step_source(cfg, k) for k in range(first))
    last_good = resume_from
    bar = tqdm(total=state.steps, initial=first, desc="opsd train", dynamic_ncols=True,
               disable=not (cfg.progress and state.accelerator.is_local_main_process))
    for step in range(first, state.steps):
        values = train_step(state, step, last_good=last_good)
        done = step + 1
        if done % cfg.log_every == 0 or done == state.steps:
            metrics.log(done, values)
        bar.update(1)
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", hint=f"{values['teacher/hint_effect']:.3f}")
        if cfg.save_every and done % cfg.save_every == 0 and done < state.steps:
            last_good = save_checkpoint(state.accelerator, out, done, cfg.keep_checkpoints)
        if on_step is not None:
            on_step(done, values)
    bar.close()
    return save(state, out)


def data_metrics(report: dict) -> dict:
    """The data counts of data.json as step-0 metrics (`data/kept`, `data/skipped_too_long`, ...)."""
    return ({f"data/{k}": v for k, v in report.items() if not isinstance(v, dict)}
            | {f"data/skipped_{k}": v for k, v in report["skipped"].items()})
