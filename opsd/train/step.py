"""One optimizer step of `opsd train`, as named stages a benchmark can call one by one.

    from opsd.train import step
    data = step.draw(state, s)                   # the step's source and this process's micro-batches of records
    totals = step.accumulate(state, data)        # per micro-batch: targets -> loss -> backward
    grad_norm = step.optimizer_step(state, data, totals)   # NaN/inf guard, clip, step, schedule, teacher update
    values = step.step_metrics(state, data, totals, grad_norm)
    values = step.train_step(state, s)          # all four

`state` (`TrainState`) holds what the loop reads (built by `opsd.train.run.start`). The loss of a
step is the mean per-token objective over every target token of the global batch (all processes
and micro-batches), so N processes give the same update as one with an N-times larger batch.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from opsd.train import diagnostics, losses
from opsd.train.losses import FullLogits, Targets, TopK
from opsd.train.records import TrainRecord
from opsd.train.scoring import SpanBatch, collate
from opsd.train.sources import RewardFn, source_records, step_source
from opsd.train.student import Student
from opsd.train.teachers import Teacher
from opsd.types import StageError


class NonFiniteLossError(StageError):
    """Raised when a step's loss or gradient norm is NaN/inf; no update or checkpoint is written."""


@dataclass
class MicroBatch:
    student: SpanBatch  # the student's sequences and target positions
    teacher: SpanBatch  # the teacher's (hinted / instructed) sequences, same target tokens
    topk: TopK | None = None  # targets precomputed before training, when the records carry them
    advantage_N: torch.Tensor | None = None  # (N,) GKD+RL: the sequence's advantage at each of its tokens
    sft: bool = False  # supervised step (cold start): the objective is the NLL of the targets
    weight_N: torch.Tensor | None = None  # (N,) per-token weight: 0 between the errors of a record, --anchor off them

    @property
    def span_tokens(self) -> float:
        return len(self.student.targets) if self.weight_N is None else float(self.weight_N.sum())

    def weighted(self, x_N: torch.Tensor) -> torch.Tensor:
        """x at the tokens that carry loss (every target token unless some record masks tokens between errors)."""
        return x_N if self.weight_N is None else x_N * self.weight_N.to(x_N.device)


def make_micro_batch(records: list[TrainRecord], pad_id: int, *, sft: bool = False) -> MicroBatch:
    """Collate records into padded student/teacher batches with their (N,) target-token tensors."""
    student = collate([r.student_ids for r in records], [r.student_span for r in records], pad_id=pad_id)
    teacher = collate([r.teacher_ids for r in records], [r.teacher_span for r in records], pad_id=pad_id)
    topk = None
    with_topk = [r.teacher_topk is not None for r in records]
    if any(with_topk):
        if not all(with_topk):
            raise ValueError("a micro-batch mixes records with and without precomputed targets")
        tks = [r.teacher_topk for r in records]
        tails = None if any(t.tail_logprobs is None for t in tks) else torch.tensor([x for t in tks for x in t.tail_logprobs])
        t_lp = None if any(t.target_logprobs is None for t in tks) else torch.tensor([x for t in tks for x in t.target_logprobs])
        topk = TopK(torch.tensor([row for t in tks for row in t.ids]),  # (N, k)
                    torch.tensor([row for t in tks for row in t.logprobs]), tails, t_lp)  # (N, k), (N,), (N,)
    adv = None
    if any(r.advantage is not None for r in records):
        adv = torch.tensor([r.advantage or 0.0 for r, n in zip(records, student.lengths) for _ in range(n)])  # (N,)
    masks = [r.target_mask for r in records]
    weight = None
    if any(m is not None for m in masks):
        weight = torch.tensor([float(w) for m, n in zip(masks, student.lengths) for w in (m or [True] * n)])  # (N,)
    return MicroBatch(student, teacher, topk, adv, sft, weight)


@dataclass
class TrainState:
    """What one optimizer step reads and updates."""

    cfg: object  # TrainConfig
    accelerator: object
    student: Student
    teacher: Teacher | None  # None when every target was precomputed
    tok: object
    records: list[TrainRecord]
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps: int  # total optimizer steps of the run (cold start included)
    reward_fn: RewardFn | None = None
    sources: Counter = field(default_factory=Counter)  # steps drawn per source so far

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id or 0


@dataclass
class StepData:
    step: int
    source: str
    micro: list[list[TrainRecord]]  # this process's micro-batches
    stats: Counter  # sampling stats (sampled replies, rewards)
    n_tokens: float  # target tokens of the global batch (weighted: --anchor)
    n_examples: int  # examples of the global batch (before sampling)
    times: dict = field(default_factory=dict)  # seconds per phase


def step_batches(n_examples: int, step: int, cfg, rank: int, world: int) -> tuple[list[list[int]], list[int]]:
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


def draw(state: TrainState, step: int) -> StepData:
    """The step's data source and this process's micro-batches of records (sampled where the source samples)."""
    t0 = time.perf_counter()
    cfg, acc = state.cfg, state.accelerator
    source = step_source(cfg, step)
    mine, window = step_batches(len(state.records), step, cfg, acc.process_index, acc.num_processes)
    micro, stats = source_records(source, [[state.records[i] for i in idx] for idx in mine], student=state.student,
                                  teacher=state.teacher, tok=state.tok, cfg=cfg, reward_fn=state.reward_fn,
                                  seed=cfg.seed + 1_000_003 * (step + 1) + 7_919 * acc.process_index)
    local = sum(r.n_targets for recs in micro for r in recs)
    n_tokens = acc.reduce(torch.tensor(float(local), device=acc.device), reduction="sum").item()  # weighted (--anchor)
    n_tokens = int(n_tokens) if float(n_tokens).is_integer() else n_tokens
    return StepData(step, source, micro, stats, n_tokens, len(window), {"draw_s": time.perf_counter() - t0})


def targets(teacher: Teacher | None, mb: MicroBatch, cfg=None) -> Targets | None:
    """The teacher's targets at the micro-batch's target tokens: precomputed top-k, or full logits (no grad);
    None where the objective has no divergence (mode=sft / reinforce: no teacher)."""
    if mb.topk is not None:
        return mb.topk
    if cfg is not None and cfg.is_supervised:
        return None
    if teacher is None:
        raise RuntimeError("records without precomputed targets, and no teacher to compute them")
    return FullLogits(teacher.logits(mb.teacher))


def objective(mb: MicroBatch, div_N: torch.Tensor, student_lp_N: torch.Tensor, rl_alpha: float) -> torch.Tensor:
    """The step objective summed over target tokens (not yet normalised).

    sft: −Σ log q(target); distillation: Σ divergence; GKD+RL student samples:
    α·Σ divergence − (1−α)·Σ advantage · log q(target) (REINFORCE: ∇ = Σ A ∇log q); mode=reinforce is α = 0.
    """
    if mb.sft:
        return -mb.weighted(student_lp_N).sum()
    if mb.advantage_N is None:
        return mb.weighted(div_N).sum()  # tokens between the errors of a record carry no loss
    return rl_alpha * div_N.sum() - (1.0 - rl_alpha) * (mb.advantage_N.to(div_N.device) * student_lp_N).sum()


def reuses_student_kv(state: TrainState, mb: MicroBatch) -> bool:
    """Whether this micro-batch's teacher pass starts from the student's forward (teacher=self, see
    `opsd.train.shared_prefix.logits_after_student`) instead of running the whole hinted sequence.

    OPSD only: its hinted targets stand nats away from the student. In GKD a teacher equal to the student must
    give a divergence of exactly 0, and a differently computed teacher pass gives rounding noise instead,
    which Adam turns into full-size steps (tests/train/test_gkd.py)."""
    t, cfg = state.teacher, state.cfg
    return (cfg.teacher_reuses_prefix and not cfg.is_gkd and mb.topk is None and not cfg.is_supervised and t is not None
            and getattr(t, "reads_student_kv", False) and state.student.kv_reusable(cfg))


def loss(student: Student, mb: MicroBatch, tgt: Targets | None, cfg, *,
         logits_NV: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of one micro-batch (with grad) and its detached sums for the metrics.

    The forward runs under the precision's autocast (or was run by the caller: `logits_NV`); the
    log-softmax, the divergence and the diagnostics run in fp32 outside it.
    """
    dev = student.accelerator.device
    if logits_NV is None:
        logits_NV = student.logits(mb.student)  # (N, V)
    targets_N = mb.student.targets.to(dev)
    with torch.autocast(device_type=dev.type, enabled=False):
        student_lp_N = losses.token_logprobs(logits_NV, targets_N)  # (N,) fp32, with grad
        s_lp = student_lp_N.detach()
        if tgt is None:  # mode=sft / reinforce: no teacher, so no divergence and no teacher diagnostics
            div_N, teacher_lp_N, diag = torch.zeros_like(s_lp), s_lp, {}
        else:
            tgt = tgt.to(dev) if isinstance(tgt, TopK) else FullLogits(tgt.logits_NV.to(dev))
            div_N = losses.divergence(logits_NV, tgt, kind=cfg.loss, beta=cfg.beta, temperature=cfg.temperature)
            with torch.no_grad():
                if isinstance(tgt, TopK):
                    teacher_lp_N = tgt.target_logprobs_N
                else:
                    teacher_lp_N = losses.token_logprobs(tgt.logits_NV, targets_N)
                diag = diagnostics.token_diagnostics(logits_NV, tgt, k=cfg.diag_top_k, temperature=cfg.temperature)
        obj = objective(mb, div_N, student_lp_N, 0.0 if cfg.mode == "reinforce" else cfg.rl_alpha)
        w = mb.weighted  # every sum over the tokens that carry loss, as the step's token count
        stats = {"div": w(div_N.detach()).sum(), "student_lp": w(s_lp).sum(),
                 "hint_effect": w(teacher_lp_N - s_lp).sum() if teacher_lp_N is not None else torch.tensor(math.nan)}
        stats |= {f"diag_{k}": w(v).sum() for k, v in diag.items()}
    return obj, stats


PAD_SLACK = 1.25  # a micro-batch runs as pieces whose sequences are within this factor of the piece's longest


def by_length(records: list[TrainRecord], slack: float | None = None) -> list[list[TrainRecord]]:
    """A micro-batch as pieces that pad little: longest first, a new piece wherever a sequence is shorter than the
    piece's longest / `slack`. Each piece's loss is scaled by the step's token count and gradients add up, so the
    update is the same as from the whole micro-batch; only the padding is not run (the cold start's batches of 8
    were 33% padding, RESULTS.md §0d)."""
    slack = PAD_SLACK if slack is None else slack
    pieces: list[list[TrainRecord]] = []
    for r in sorted(records, key=lambda r: -len(r.student_ids)):
        if not pieces or len(r.student_ids) * slack < len(pieces[-1][0].student_ids):
            pieces.append([])
        pieces[-1].append(r)
    return pieces


def accumulate(state: TrainState, data: StepData) -> Counter:
    """Per micro-batch, in pieces of similar length (`by_length`): targets -> loss -> backward (gradients summed);
    returns the stats summed over processes."""
    acc, cfg = state.accelerator, state.cfg
    world = acc.num_processes
    sums = Counter(data.stats)
    times = Counter()
    pieces = [piece for recs in data.micro for piece in by_length(recs)]
    for k, recs in enumerate(pieces):
        mb = make_micro_batch(recs, state.pad_id, sft=data.source == "sft")
        reuse = reuses_student_kv(state, mb)
        t = time.perf_counter()
        tgt = None if reuse else targets(state.teacher, mb, cfg)
        times["teacher_s"] += time.perf_counter() - t
        last = k == len(pieces) - 1
        with acc.no_sync(state.student.span_lm) if not last else nullcontext():
            t = time.perf_counter()
            logits_NV = None
            if reuse:  # student forward first; the teacher pass continues from its keys/values
                cache = DynamicCache()
                logits_NV = state.student.logits(mb.student, cache)
                t_teacher = time.perf_counter()
                tgt = FullLogits(state.teacher.logits_after_student(cache, recs, state.pad_id))
                del cache
                times["teacher_s"] += time.perf_counter() - t_teacher
                t += time.perf_counter() - t_teacher
            obj, stats = loss(state.student, mb, tgt, cfg, logits_NV=logits_NV)
            times["student_forward_s"] += time.perf_counter() - t
            t = time.perf_counter()
            # DDP averages gradients over processes, so scale by world / global target tokens
            acc.backward(obj * world / data.n_tokens)
            times["backward_s"] += time.perf_counter() - t
        sums.update({name: v.item() for name, v in stats.items()})
    data.times.update(times)
    names = sorted(sums)  # the same keys on every process (the step's source is global)
    local = torch.tensor([float(sums[n]) for n in names], device=acc.device, dtype=torch.float64)
    return Counter(dict(zip(names, acc.reduce(local, reduction="sum").tolist())))


def optimizer_step(state: TrainState, data: StepData, totals: Counter, *, last_good=None) -> float:
    """Stop on a non-finite loss or gradient norm (clipping on or off), else clip, step and update the teacher.

    Returns the gradient norm before clipping.
    """
    t = time.perf_counter()
    acc, cfg = state.accelerator, state.cfg
    params = [p for p in state.student.span_lm.parameters() if p.requires_grad]
    # max_norm=inf measures the norm without clipping, so the guard sees it with clipping off too
    grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
    loss_value = totals["div"] / data.n_tokens
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        state.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"non-finite loss {loss_value} (grad norm {grad_norm}) at step {data.step + 1}; stopped without "
            f"updating. Last good checkpoint: {last_good or 'none (no checkpoint written yet)'}; lower --lr or check "
            "the examples, then rerun with --resume")
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.teacher is not None:
        state.teacher.update(state.student)
    data.times["optimizer_s"] = time.perf_counter() - t
    return grad_norm


def step_metrics(state: TrainState, data: StepData, totals: Counter, grad_norm: float) -> dict:
    """The metrics of one step (metrics.jsonl names), from the global sums."""
    n = data.n_tokens
    values = {"train/loss": totals["div"] / n, "train/span_tokens": n, "train/error_logprob": totals["student_lp"] / n,
              "teacher/hint_effect": totals["hint_effect"] / n,
              "train/epoch": (data.step + 1) * data.n_examples / len(state.records), "train/grad_norm": grad_norm,
              "train/step_time_s": sum(data.times.values())}
    values |= {f"time/{k}": v for k, v in data.times.items()}  # seconds per phase: draw, teacher, forward, ...
    values |= {diagnostics.metric_name(k[5:], state.cfg.diag_top_k): v / n for k, v in totals.items() if k.startswith("diag_")}
    values |= {f"source/{k}": v for k, v in state.sources.items()} | {"source/on_policy": float(data.source == "student")}
    if data.source == "sft":
        values["train/sft_nll"] = -totals["student_lp"] / n
    if "sampled_replies" in totals:
        values["source/sampled_replies"] = totals["sampled_replies"]
    if totals.get("reward_n"):
        values["rl/reward_mean"] = totals["reward_sum"] / totals["reward_n"]
    return values


def train_step(state: TrainState, step: int, *, last_good=None) -> dict:
    """draw -> accumulate (targets, loss, backward) -> optimizer step; returns the step's metrics (phase times: time/*)."""
    data = draw(state, step)
    state.sources[data.source] += 1
    totals = accumulate(state, data)
    lr = state.scheduler.get_last_lr()[0]  # the rate this step's update uses (the scheduler steps after it)
    grad_norm = optimizer_step(state, data, totals, last_good=last_good)
    return step_metrics(state, data, totals, grad_norm) | {"train/lr": lr}
