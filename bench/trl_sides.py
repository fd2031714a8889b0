"""The TRL sides of bench/step.py and bench/curves.py: one training step of TRL's two distillation trainers
on the same trajectories as opsd, at a given precision.

- `gkd`: `trl.experimental.gkd.GKDTrainer` as its docs set it up: student and teacher as two model
  copies, lmbda=0 (the given trajectories, no generation), beta=0.5. The data is pre-tokenised, so a
  6-line collator passes the ids with labels = -100 outside the error span. It computes full-vocabulary
  logits at every position of both models.
- `distill`: `trl.DistillationTrainer` (stable in TRL 1.16): chunked generalised JSD over the completion
  positions only (`_chunked_divergence_loss`: the `lm_head` is applied tile by tile, never to the
  whole sequence). It is on-policy only: every step it renders the dataset's prompts and generates
  completions. Here the prompt is the trajectory up to the error span and the completion is the
  span, given (`GivenCompletions` returns them from `_tokenize_prompts` / `_generate_single_turn`
  instead of generating), so it trains on exactly the tokens opsd trains on; the rest of its step
  (batching, padding, masks, the loss, backward, optimizer) is TRL's own code.

Both run where `a.device` says (CPU by default; `bench/step.py --device cuda`). Both: same AdamW settings
as opsd, grad clip 1.0, gradient checkpointing off (TRL turns it on by default, and bf16 too, even on
CPU), bf16 autocast with fp32 master weights exactly when the precision is bf16 (`bf16=True`, as opsd's
bf16). Their teacher reads the student's input ids: neither trainer can give the teacher a different
(hinted) sequence, so their teacher sees no hint. The timed interval is `on_step_begin` -> `on_step_end`
(data, forward, backward, clip, optimizer step).
"""
from __future__ import annotations

import os
import tempfile
import time

TRAINERS = ("gkd", "distill")


def _timer(device: str = "cpu"):
    import torch
    from transformers import TrainerCallback

    def sync():  # queued CUDA work belongs to the step it was queued in
        if device == "cuda":
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.times = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.times.append(time.perf_counter() - self.begin)

    return StepTimer()


def _common_args(a, precision: str, out_dir: str) -> dict:
    return {"output_dir": out_dir, "per_device_train_batch_size": a.batch, "gradient_accumulation_steps": 1,
            "max_steps": a.warmup + a.steps, "learning_rate": a.lr, "lr_scheduler_type": "cosine",
            "optim": "adamw_torch", "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "max_grad_norm": 1.0,
            "temperature": 1.0, "beta": 0.5, "bf16": precision == "bf16", "fp16": False, "gradient_checkpointing": False,
            "use_cpu": getattr(a, "device", "cpu") == "cpu", "report_to": "none", "save_strategy": "no", "logging_steps": 10**6,
            "dataloader_num_workers": 0, "seed": 0, "disable_tqdm": True}


def run_trl(a, trainer: str, precision: str, model_dir: str, examples, peak_rss_gb) -> dict:
    """One TRL trainer (`gkd` | `distill`) for warmup + steps on `examples` (HintedExamples; the student side)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset

    from opsd.io import models

    t0 = time.perf_counter()
    device = getattr(a, "device", "cpu")
    student, tok = models.load(model_dir, device=device, dtype=torch.float32)  # fp32 master weights, as opsd
    teacher, _ = models.load(model_dir, device=device, dtype=torch.float32)  # the second copy both trainers need
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_gb()
    timer = _timer(device)
    out_dir = tempfile.mkdtemp(prefix=f"bench-trl-{trainer}-")
    spans = [ex.student_span for ex in examples]
    if trainer == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        rows = [{"input_ids": ex.student_ids,
                 "labels": [-100] * s0 + ex.student_ids[s0:s1] + [-100] * (len(ex.student_ids) - s1)}
                for ex, (s0, s1) in zip(examples, spans)]

        def collate(feats):  # pre-tokenised rows, all the same length
            ids = torch.tensor([f["input_ids"] for f in feats])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.tensor([f["labels"] for f in feats])}

        args = GKDConfig(**_common_args(a, precision, out_dir), lmbda=0.0, max_length=None)
        tr = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows * 64),
                        processing_class=tok, data_collator=collate, callbacks=[timer])
        extra = {"lmbda": tr.lmbda}
    else:
        from trl import DistillationConfig, DistillationTrainer

        given = {f"ex{i}": (ex.student_ids[:s0], ex.student_ids[s0:s1]) for i, (ex, (s0, s1)) in enumerate(zip(examples, spans))}
        by_prompt = {tuple(p): c for p, c in given.values()}

        class GivenCompletions(DistillationTrainer):
            """DistillationTrainer on given trajectories: prompt = ids before the error span, completion = the span."""

            def _tokenize_prompts(self, prompts):
                return [list(given[p][0]) for p in prompts], None, {}

            def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
                return [list(by_prompt[tuple(p)]) for p in prompt_ids]

        tok.padding_side = "left"
        args = DistillationConfig(**_common_args(a, precision, out_dir), max_completion_length=max(s1 - s0 for s0, s1 in spans))
        tr = GivenCompletions(model=student, teacher_model=teacher, args=args,
                              train_dataset=Dataset.from_list([{"prompt": k} for k in given] * 64),
                              processing_class=tok, callbacks=[timer])
        extra = {}
    settings = {"trainer": type(tr).__mro__[1 if trainer == "distill" else 0].__name__, "bf16": tr.args.bf16,
                "gradient_checkpointing": tr.args.gradient_checkpointing, "beta": tr.beta,
                "optimizer": type(tr.create_optimizer()).__name__,
                "student_dtype": str(next(tr.model.parameters()).dtype),
                "teacher_dtype": str(next(tr.teacher_model.parameters()).dtype), **extra}
    tr.train()
    n_tokens = sum(len(ex.student_ids) for ex in examples)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"times": timer.times[a.warmup:], "load_s": load_s, "rss_after_load_gb": rss_loaded,
            "peak_rss_gb": peak_rss_gb(), "peak_gpu_gb": peak_gpu, "student_tokens": n_tokens, "teacher_tokens": n_tokens,
            "span_tokens": sum(s1 - s0 for s0, s1 in spans), "settings": settings, "precision": precision}
