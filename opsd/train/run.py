"""`opsd train`: targeted on-policy self-distillation on critiqued trajectories (explicit accelerate loop).

    opsd train --model smollm2-135m-instruct --trajectories data/sample_openai.jsonl \\
        --critiques data/sample_critiques.jsonl --out runs/demo --max-steps 8 --lr 5e-5
    accelerate launch --multi_gpu --num_processes 2 -m opsd.train ...    # DDP (add --cpu: gloo on CPU)

Stages (`main` reads top to bottom):
1. load the student (optionally LoRA, gradient checkpointing) and the teacher (`opsd.train.teachers`);
2. OPSD: build hinted examples from the `error` critiques whose trajectory hash matches (`opsd.hint.build`),
   measure every example's hint effect, filter on `--min-hint-effect`, optionally precompute
   top-k teacher targets. GKD (`--mode gkd`, or no --critiques): prompt/reply records of every
   trajectory's last assistant message (`opsd.train.sources`). Either is saved as OUT/examples.jsonl with
   the counts in OUT/data.json; `--select-prompts` keeps the teacher-aligned ones (plus a few others);
3. loop: step data (`opsd.train.sources.step_kind`: cold-start SFT, dataset, student or teacher samples) ->
   teacher targets (no grad) -> student loss on the target tokens only -> optimizer step, with
   metrics (OPD diagnostics `diag/*` from `opsd.train.diagnostics`), checkpoints and a NaN/inf stop;
4. save OUT/model (full weights, or the LoRA adapter), loadable by `opsd.io.models.load`.

    opsd train --trajectories data/sample_openai.jsonl --out runs/gkd --teacher external \\
        --teacher-model TEACHER_DIR --lmbda 0.5 --beta 0.5 --max-steps 8        # GKD, see opsd.train.sources

The loss of one optimizer step is the mean per-token divergence over every span token of the
global batch (all processes and micro-batches), so N processes give the same update as one
process with an N-times larger batch.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from opsd.hint.build import build_examples
from opsd.io.records import read_jsonl
from opsd.train import diagnostics, losses
from opsd.train import sources as gkd
from opsd.train.checkpoints import (
    Metrics,
    latest_checkpoint,
    save_checkpoint,
    save_model,
)
from opsd.train.config import TrainConfig, add_config_arguments, config_from_args
from opsd.train.scoring import SpanBatch, SpanLM, collate
from opsd.train.teachers import Teacher, make_teacher, measure
from opsd.types import Critique

log = logging.getLogger("opsd.train")


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss or gradient norm is NaN/inf; no update or checkpoint is written."""


# ---------------------------------------------------------------- stage 1: models

def setup_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and not cfg.cpu else "no"
    trackers = [t.strip() for t in cfg.report_to.split(",") if t.strip()] or None
    acc = Accelerator(cpu=cfg.cpu, mixed_precision=mp, log_with=trackers, project_dir=cfg.out)
    set_seed(cfg.seed)
    return acc


def load_student(cfg: TrainConfig, device):
    """The student in fp32 (mixed precision comes from accelerate), with LoRA and checkpointing if asked."""
    from opsd.io import models

    lm, tok = models.load(cfg.model, device=str(device), dtype=torch.float32)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
        lm = get_peft_model(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                           target_modules=targets, task_type="CAUSAL_LM"))
    lm.train()
    return lm, tok


def load_teacher(cfg: TrainConfig, lm, tok, accelerator) -> Teacher:
    external = None
    if cfg.teacher == "external":
        from opsd.io import models
        from opsd.train.teachers import check_same_vocab

        external, ext_tok = models.load(cfg.teacher_model, device=str(accelerator.device))
        check_same_vocab(lm, external, tok, ext_tok)
    return make_teacher(cfg.teacher, lm, lora=cfg.lora_r > 0, ema_decay=cfg.ema_decay, external_lm=external,
                        autocast=accelerator.autocast)


# ---------------------------------------------------------------- stage 2: examples

def build_dataset(cfg: TrainConfig, tok, lm, teacher: Teacher, accelerator) -> tuple[list[dict], dict]:
    """Hinted examples with their hint effect (and top-k targets), filtered; plus the counts."""
    from accelerate.utils import gather_object

    from opsd.io.trajectories import load_trajectories

    trajs = load_trajectories(cfg.trajectories)
    critiques = [Critique.from_dict(d) for d in read_jsonl(cfg.critiques)]
    examples, counts = build_examples(trajs, critiques, tok, placement=cfg.placement, span=cfg.span,
                                      inline_tags=(cfg.inline_open, cfg.inline_close))
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = examples[rank::world]  # each process measures its share, then everyone gets all of them
    top_k = cfg.top_k if cfg.precompute_targets else 0
    scores = measure(teacher, lm, mine, batch_size=cfg.batch_size, top_k=top_k, temperature=cfg.temperature,
                     pad_id=tok.pad_token_id or 0)
    shares = gather_object([[(rank + world * j, s) for j, s in enumerate(scores)]]) if world > 1 else [list(enumerate(scores))]
    by_index = dict(pair for share in shares for pair in share)
    effects = [by_index[i]["hint_effect"] for i in range(len(examples))]
    # keep the hints that lower the error tokens enough; --select-prompts mixes back a fraction of the others
    keep, mixed_back = gkd.select_indices([e < -cfg.min_hint_effect for e in effects],
                                          mix=cfg.select_mix if cfg.select_prompts else 0.0, seed=cfg.seed)
    records = [{**examples[i].to_dict(), **by_index[i]} for i in keep]
    report = {"critiques": len(critiques), "built": len(examples), "filtered_hint_effect": len(examples) - len(keep),
              "mixed_back": mixed_back, "kept": len(records),
              "skipped": {k: v for k, v in sorted(counts.items()) if k != "used"},
              "hint_effect_mean": sum(effects) / len(effects) if effects else None,
              "hint_lowers": sum(e < 0 for e in effects)}
    return records, report


def load_records(path: Path) -> list[dict]:
    return list(read_jsonl(path))


# ---------------------------------------------------------------- stage 3: the loop

@dataclass
class MicroBatch:
    student: SpanBatch
    teacher: SpanBatch
    topk_ids: torch.Tensor | None  # (N, k) precomputed teacher targets
    topk_logprobs: torch.Tensor | None  # (N, k)
    advantage: torch.Tensor | None = None  # (N,) GKD+RL: the sequence's advantage at each of its tokens
    target_logprobs: torch.Tensor | None = None  # (N,) precomputed teacher log-prob of each target token

    @property
    def span_tokens(self) -> int:
        return len(self.student.targets)


def make_micro_batch(records: list[dict], pad_id: int) -> MicroBatch:
    student = collate([r["student_ids"] for r in records], [tuple(r["student_span"]) for r in records], pad_id=pad_id)
    teacher = collate([r["teacher_ids"] for r in records], [tuple(r["teacher_span"]) for r in records], pad_id=pad_id)
    ids = lps = None
    if "teacher_topk_ids" in records[0]:
        ids = torch.tensor([row for r in records for row in r["teacher_topk_ids"]])  # (N, k)
        lps = torch.tensor([row for r in records for row in r["teacher_topk_logprobs"]])  # (N, k)
    t_lp = None
    if "teacher_target_logprobs" in records[0]:
        t_lp = torch.tensor([x for r in records for x in r["teacher_target_logprobs"]])  # (N,)
    adv = None
    if "advantage" in records[0]:
        adv = torch.tensor([r["advantage"] for r, n in zip(records, student.lengths) for _ in range(n)])  # (N,)
    return MicroBatch(student, teacher, ids, lps, adv, t_lp)


def step_batches(n_examples: int, step: int, cfg: TrainConfig, rank: int, world: int) -> tuple[list[list[int]], list[int]]:
    """Example indices for one optimizer step: this process's micro-batches, and the whole global batch.

    The data is one endless stream of seeded permutations (epoch e uses seed + e), and step s
    takes the next global batch of `batch_size * world * grad_accum` examples. It depends on
    nothing but (seed, step), which makes resume exact and N processes equal one bigger batch.
    """
    b = cfg.batch_size
    g = b * world * cfg.grad_accum
    perms: dict[int, list[int]] = {}

    def at(q: int) -> int:
        e = q // n_examples
        if e not in perms:
            perms[e] = torch.randperm(n_examples, generator=torch.Generator().manual_seed(cfg.seed + e)).tolist()
        return perms[e][q % n_examples]

    window = [at(q) for q in range(step * g, (step + 1) * g)]
    mine = [window[(i * world + rank) * b:(i * world + rank + 1) * b] for i in range(cfg.grad_accum)]
    return mine, window


def teacher_targets(teacher: Teacher | None, mb: MicroBatch) -> torch.Tensor | None:
    """Teacher logits (N, V) on the hinted sequences, or None when top-k targets were precomputed."""
    if mb.topk_ids is not None:
        return None
    return teacher.logits(mb.teacher)


def student_loss(span_lm, mb: MicroBatch, teacher_logits: torch.Tensor | None, cfg: TrainConfig, device,
                 kind: str = "opsd"):
    """The step objective summed over the batch's span tokens (not yet normalised), and detached stats.

    sft: −Σ log q(target). Otherwise Σ divergence; on GKD+RL student samples
    α·Σ divergence − (1−α)·Σ advantage · log q(target) (REINFORCE, per-prompt mean baseline).
    """
    s = mb.student
    targets_N = s.targets.to(device)
    logits_NV = span_lm(s.input_ids.to(device), s.attention_mask.to(device), s.batch_idx.to(device), s.pos.to(device))
    s_lp_N = losses.token_logprobs(logits_NV, targets_N)  # (N,) with grad
    if teacher_logits is None:
        div_N = losses.token_divergence_topk(logits_NV, mb.topk_ids.to(device), mb.topk_logprobs.to(device),
                                             kind=cfg.loss, beta=cfg.beta, temperature=cfg.temperature)
        t_lp_N = mb.target_logprobs.to(device) if mb.target_logprobs is not None else None
        diag = diagnostics.token_diagnostics_topk(logits_NV, mb.topk_ids.to(device), mb.topk_logprobs.to(device),
                                                  k=cfg.diag_top_k, temperature=cfg.temperature)
    else:
        div_N = losses.token_divergence(logits_NV, teacher_logits, kind=cfg.loss, beta=cfg.beta,
                                        temperature=cfg.temperature)
        if kind != "opsd":  # GKD: a teacher identical to the student diverges by exactly 0; drop the rounding-noise
            # gradient of identical rows, which Adam would blow up into a full-size step (OPSD keeps its old behaviour)
            same_N = (logits_NV.detach() == teacher_logits).all(-1) & div_N.detach().isfinite()
            div_N = div_N.masked_fill(same_N, 0.0)
        t_lp_N = losses.token_logprobs(teacher_logits, targets_N)
        diag = diagnostics.token_diagnostics(logits_NV, teacher_logits, k=cfg.diag_top_k, temperature=cfg.temperature)
    if kind == "sft":
        objective = -s_lp_N.sum()
    elif mb.advantage is not None:
        pg = (mb.advantage.to(device) * s_lp_N).sum()  # ∇ = Σ A ∇log q: REINFORCE
        objective = cfg.rl_alpha * div_N.sum() - (1.0 - cfg.rl_alpha) * pg
    else:
        objective = div_N.sum()
    with torch.no_grad():
        s_lp_N = s_lp_N.detach()
        stats = {"div": div_N.detach().sum(), "student_lp": s_lp_N.sum(),
                 "hint_effect": (t_lp_N - s_lp_N).sum() if t_lp_N is not None else torch.tensor(float("nan"))}
        stats |= {f"diag_{k}": v.sum() for k, v in diag.items()}
    return objective, stats


def lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.schedule]
    return f


def total_steps(cfg: TrainConfig, n_examples: int, world: int) -> int:
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * n_examples / (cfg.batch_size * world * cfg.grad_accum)))


# ---------------------------------------------------------------- main

def main(cfg: TrainConfig, *, on_step=None, reward_fn: gkd.RewardFn | None = None) -> Path:
    """Train and return OUT/model. `on_step(step, metrics)` is called after every optimizer step.

    `reward_fn(trajectories) -> rewards` is needed for GKD+RL (rl_alpha < 1); `opsd train` builds it
    from a critic (`opsd.train.command`), since this core never imports `critic`.
    """
    if cfg.rl_alpha < 1.0 and reward_fn is None:
        raise ValueError("rl_alpha < 1 (GKD+RL) needs a reward function: main(cfg, reward_fn=...)")
    out = Path(cfg.out)
    accelerator = setup_accelerator(cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    resume_from = latest_checkpoint(out) if cfg.resume else None

    # 1. models
    lm, tok = load_student(cfg, accelerator.device)
    teacher = load_teacher(cfg, lm, tok, accelerator)
    pad_id = tok.pad_token_id or 0

    # 2. examples (a resumed run reuses the examples it was built with)
    if resume_from is not None and (out / "examples.jsonl").exists():
        records = load_records(out / "examples.jsonl")
        report = json.loads((out / "data.json").read_text())
    else:
        if cfg.is_gkd:
            records, report = gkd.build_dataset(cfg, tok, lm, teacher)
        else:
            records, report = build_dataset(cfg, tok, lm, teacher, accelerator)
        if accelerator.is_main_process:
            (out / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (out / "data.json").write_text(json.dumps(report, indent=2))
    log.info("%s examples: %s", "GKD" if cfg.is_gkd else "OPSD", json.dumps(report))
    if cfg.is_gkd and cfg.teacher in ("self", "initial") and not cfg.teacher_system and cfg.lora_r == 0:
        log.warning("GKD with the student as its own teacher and no --teacher-system: the loss is 0")
    log.info("distributed: world=%d rank=%d device=%s", accelerator.num_processes, accelerator.process_index,
             accelerator.device)
    if not records:
        raise RuntimeError(f"no usable examples ({json.dumps(report)}); check the critiques, or lower --min-hint-effect")
    if cfg.precompute_targets and not cfg.cold_start_sft:
        teacher = None  # targets live in the examples; an external teacher's weights can go
    world = accelerator.num_processes
    steps = cfg.cold_start_sft + total_steps(cfg, len(records), world)

    # 3. optimizer, schedule, distribution, resume
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    span_lm, optimizer = accelerator.prepare(SpanLM(lm), optimizer)
    accelerator.register_for_checkpointing(scheduler)  # not prepared: accelerate would step it once per process
    if teacher is not None and teacher.name == "ema":
        accelerator.register_for_checkpointing(teacher.lm)
    start = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        start = json.loads((resume_from / "trainer_state.json").read_text())["step"]
        log.info("resumed from %s at step %d", resume_from, start)
    metrics = Metrics(accelerator, out / "metrics.jsonl", cfg)
    if start == 0:
        metrics.log(0, {f"data/{k}": v for k, v in report.items() if not isinstance(v, dict)}
                    | {f"data/skipped_{k}": v for k, v in report["skipped"].items()})
    last_good = resume_from
    sources = Counter(gkd.step_kind(cfg, s) for s in range(start))  # steps per data source so far

    # 4. the loop: step data (dataset / samples) -> teacher targets -> student loss -> step
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, disable=not (cfg.progress and accelerator.is_local_main_process),
               desc="opsd train", dynamic_ncols=True)
    for step in range(start, steps):
        t0 = time.perf_counter()
        kind = gkd.step_kind(cfg, step)
        sources[kind] += 1
        mine, window = step_batches(len(records), step, cfg, accelerator.process_index, world)
        micro, sums = gkd.make_step_records(
            kind, [[records[i] for i in idx] for idx in mine], student_lm=accelerator.unwrap_model(span_lm).lm,
            teacher=teacher, tok=tok, cfg=cfg, seed=cfg.seed + 1_000_003 * (step + 1) + 7_919 * accelerator.process_index,
            reward_fn=reward_fn)
        sums = Counter(sums)
        sums["tokens"] = sum(r["student_span"][1] - r["student_span"][0] for recs in micro for r in recs)
        n_tokens = int(accelerator.reduce(torch.tensor(sums["tokens"], device=accelerator.device), reduction="sum"))
        for k, recs in enumerate(micro):
            mb = make_micro_batch(recs, pad_id)
            targets = teacher_targets(teacher, mb)
            sync = k == len(micro) - 1
            with (accelerator.no_sync(span_lm) if not sync else _nullcontext()):
                objective, stats = student_loss(span_lm, mb, targets, cfg, accelerator.device, kind)
                # DDP averages gradients over processes, so scale by world / global span tokens:
                accelerator.backward(objective * world / n_tokens)
            sums.update({k_: v.item() for k_, v in stats.items()})
        names = sorted(sums)  # the same keys on every process (the step kind is global)
        totals = dict(zip(names, accelerator.reduce(torch.tensor([float(sums[n]) for n in names], device=accelerator.device,
                                                                  dtype=torch.float64), reduction="sum").tolist()))
        grad_norm = accelerator.clip_grad_norm_(span_lm.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
        loss = totals["div"] / n_tokens
        if not math.isfinite(loss) or (grad_norm is not None and not torch.isfinite(grad_norm)):
            bar.close()
            raise NonFiniteLossError(
                f"non-finite loss {loss} (grad norm {None if grad_norm is None else grad_norm.item()}) at step {step + 1}; "
                f"stopped without updating. Last good checkpoint: {last_good or 'none (no checkpoint written yet)'}; "
                "lower --lr or check the examples, then rerun with --resume")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            teacher.update(lm)
        done = step + 1
        values = {"train/loss": loss, "train/span_tokens": n_tokens, "train/error_logprob": totals["student_lp"] / n_tokens,
                  "teacher/hint_effect": totals["hint_effect"] / n_tokens, "train/lr": scheduler.get_last_lr()[0],
                  "train/epoch": done * len(window) / len(records), "train/step_time_s": time.perf_counter() - t0}
        values |= {diagnostics.metric_name(n[5:], cfg.diag_top_k): v / n_tokens for n, v in totals.items()
                   if n.startswith("diag_")}
        values |= {f"source/{k_}": v for k_, v in sources.items()} | {"source/on_policy": float(kind == "student")}
        if kind == "sft":
            values["train/sft_nll"] = -totals["student_lp"] / n_tokens
        if "sampled_replies" in totals:
            values["source/sampled_replies"] = totals["sampled_replies"]
        if "reward_n" in totals:
            values["rl/reward_mean"] = totals["reward_sum"] / totals["reward_n"]
        if grad_norm is not None:
            values["train/grad_norm"] = grad_norm.item()
        if done % cfg.log_every == 0 or done == steps:
            metrics.log(done, values)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", hint=f"{values['teacher/hint_effect']:.3f}")
        if cfg.save_every and done % cfg.save_every == 0 and done < steps:
            last_good = save_checkpoint(accelerator, out, done, cfg.keep_checkpoints)
        if on_step is not None:
            on_step(done, values)
    bar.close()

    # 5. save
    accelerator.wait_for_everyone()
    dest = out / "model"
    if accelerator.is_main_process:
        dest = save_model(cfg, accelerator.unwrap_model(span_lm).lm, tok, out)
    if cfg.save_every:  # a final checkpoint lets a later run with more --max-steps continue
        save_checkpoint(accelerator, out, steps, cfg.keep_checkpoints)
    accelerator.end_training()
    return dest


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args, reward_fn: gkd.RewardFn | None = None) -> int:
    cfg = config_from_args(args)
    for name in ("trajectories", "out") + (() if cfg.is_gkd else ("critiques",)):
        if not getattr(cfg, name):
            print(f"opsd train: --{name} is required (flag or YAML key)")
            return 2
    if cfg.rl_alpha < 1.0 and reward_fn is None:
        print("opsd train: --rl-alpha < 1 needs a reward; run it as `opsd train` (opsd.train.command builds it)")
        return 2
    try:
        dest = main(cfg, reward_fn=reward_fn)
    except NonFiniteLossError as e:
        print(f"opsd train: {e}")
        return 1
    print(f"model saved to {dest}")
    return 0


if __name__ == "__main__":  # `python -m opsd.train ...` / `accelerate launch -m opsd.train ...`
    import argparse
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _parser = argparse.ArgumentParser(prog="opsd train", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
