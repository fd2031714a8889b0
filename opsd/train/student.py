"""The student as the training loop sees it: loaded, prepared by accelerate, read through its wrapper.

    from opsd.train.student import Student, load_student
    lm, tok = load_student(cfg, device)       # fp32 master weights, LoRA / gradient checkpointing if asked
    student = Student(lm, accelerator)
    optimizer = student.prepare(optimizer)    # DDP (or another accelerate wrapper) around SpanLM(lm)
    logits_NV = student.logits(span_batch)    # forward through the prepared wrapper, with grad
    with student.full_weights() as lm: ...    # the plain HF model with all its weights (sampling, EMA)

Every forward pass that reads the student's current weights, the `self` teacher's included, goes
through the prepared wrapper, so that a wrapper that shards the weights sees all its calls.
Sampling and the EMA update need the plain model with all its weights (`full_weights`): under
DDP that is the model itself; under a sharding wrapper (FSDP, DeepSpeed ZeRO-3) opsd refuses
with a clear error, since those paths could not be tested here (accelerate runs neither on CPU).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from opsd.io import models
from opsd.train.scoring import SpanBatch, SpanLM
from opsd.types import StageError

SHARDING_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def load_student(cfg, device):
    """(lm, tokenizer): the student in fp32 (autocast gives bf16 matmuls), with LoRA and checkpointing if asked."""
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


def _refuse(kind: str, runs: str, world: int) -> StageError:
    return StageError(
        f"accelerate was launched with {kind} but runs {runs} (world={world}): accelerate {kind} needs GPUs (on CPU "
        "it either starts independent single processes, falls back to DDP or fails to start). On CPU use "
        "`accelerate launch --multi_gpu --num_processes N -m opsd.train --cpu ...` (DDP over gloo).")


def check_launch_env(device: str) -> None:
    """Before the accelerator exists: FSDP/DeepSpeed asked for on CPU (accelerate would fail or fall back)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for env, kind in SHARDING_ENV.items():
        if os.environ.get(env, "false").lower() == "true" and device == "cpu":
            raise _refuse(kind, "MULTI_CPU" if world > 1 else "NO", world)


def check_launch(accelerator) -> None:
    """Refuse a launch that asked for FSDP/DeepSpeed but did not get it (accelerate on CPU silently falls back)."""
    for env, kind in SHARDING_ENV.items():
        if os.environ.get(env, "false").lower() == "true" and accelerator.distributed_type.name != kind:
            raise _refuse(kind, accelerator.distributed_type.name, accelerator.num_processes)


class Student:
    """The trained model: `lm` (the plain HF model, maybe peft) and `span_lm`, the wrapper the loop calls."""

    def __init__(self, lm, accelerator):
        self.lm, self.accelerator = lm, accelerator
        self.span_lm = SpanLM(lm)  # replaced by the prepared wrapper in `prepare`
        self.prepared = False

    @property
    def sharded(self) -> bool:
        """Whether accelerate shards the weights (then the plain model does not hold them all)."""
        return self.accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")

    def prepare(self, optimizer):
        """Wrap the student (and the optimizer) for the launch's distribution; returns the prepared optimizer."""
        self.span_lm, optimizer = self.accelerator.prepare(self.span_lm, optimizer)
        self.prepared = True
        return optimizer

    def logits(self, batch: SpanBatch, cache=None) -> torch.Tensor:
        """Logits (N, V) at the batch's target positions, through the prepared wrapper (autocast inside); with
        `cache` (an empty DynamicCache) the forward's keys/values are left there too."""
        dev = self.accelerator.device
        with self.accelerator.autocast():
            return self.span_lm(batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.batch_idx.to(dev),
                                batch.pos.to(dev), cache)

    def kv_reusable(self, cfg) -> bool:
        """Whether keys/values of this student's training forward equal those of an eval-mode forward of the same
        weights: no dropout, no recomputation, not sharded (a teacher=self pass may then start from them)."""
        drop = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.lm.modules())
        c = getattr(self.lm, "config", None)
        drop = drop or float(getattr(c, "attention_dropout", 0.0) or 0.0) > 0
        return not (drop or self.sharded or cfg.gradient_checkpointing)

    @contextlib.contextmanager
    def full_weights(self, purpose: str) -> Iterator[torch.nn.Module]:
        """The plain HF model holding all current weights, for `purpose` (sampling, the EMA update)."""
        if self.sharded and self.prepared:
            raise StageError(
                f"{purpose} needs the student's full weights outside the {self.accelerator.distributed_type.name} "
                "wrapper, which opsd does not gather; use DDP (`accelerate launch --multi_gpu`) for this mode")
        yield self.lm
