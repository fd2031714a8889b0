"""Where each optimizer step's training records come from: the data sources of `opsd train`.

Before training, one dataset of `TrainRecord`s per mode:
- `build_opsd`: hinted examples of the `error` critiques (`opsd.hint.build`), their hint effect
  (`opsd.hint.measure`), filtered on `--min-hint-effect`, with the teacher's top-k targets when
  they are precomputed;
- `build_gkd`: prompt/reply records, the prompt being everything before a trajectory's last
  assistant message and the reply that message, end-of-turn token included (GKD, Agarwal et al.,
  ICLR 2024). The teacher's prompt may carry `--teacher-system` (context distillation).

Then each step draws its records from one source, chosen from (seed, step) alone so that resume
stays exact (`step_source`):

- `sft`      the first `--cold-start-sft` steps: supervised (NLL) on the dataset replies (GKD), or on
             teacher samples (GKD `--seq-kd`; OPSD: the hinted teacher's continuation from the error);
- `opsd`     OPSD after the cold start: the hinted examples as they are;
- `dataset`  GKD: the dataset replies;
- `student`  GKD, with probability `--lmbda`: fresh student samples on the batch's prompts
             (`--samples-per-prompt` each under GKD+RL, with REINFORCE advantages from `reward_fn`);
- `teacher`  GKD otherwise with `--seq-kd`: teacher samples (sequence-level KD);
- `reinforce` mode=reinforce: the trajectories' last replies with their REINFORCE advantages
             (`build_supervised`); mode=sft draws `sft` every step, on the trajectories' last replies.

Records longer than the model's context are skipped and counted (`skipped.too_long` in data.json).
"""
from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from opsd.hint.build import build_examples
from opsd.hint.measure import measure
from opsd.logs import read_critiques, read_logs
from opsd.render import context_limit, eot_ids, render, with_system_text
from opsd.rollout.run import generate_batch, parse_calls
from opsd.train.diagnostics import token_diagnostics
from opsd.train.records import Prompt, TrainRecord
from opsd.train.scoring import collate, eval_mode, span_logits
from opsd.types import Trajectory

RewardFn = Callable[[list[Trajectory]], list[float]]  # one reward per sampled trajectory (injected by the CLI)
SOURCES = ("sft", "opsd", "dataset", "student", "teacher", "reinforce")


# ---------------------------------------------------------------- which source a step draws from

def gkd_source(cfg, step: int) -> str:
    """GKD after the cold start: `student` with probability lmbda, else `teacher` (seq-KD) or `dataset`."""
    if random.Random(f"gkd:{cfg.seed}:{step}").random() < cfg.lmbda:
        return "student"
    return "teacher" if cfg.seq_kd else "dataset"


def step_source(cfg, step: int) -> str:
    """The data source of optimizer step `step`: `sft` during the cold start, then the mode's own."""
    if cfg.mode in ("sft", "reinforce"):
        return cfg.mode
    if step < cfg.cold_start_sft:
        return "sft"
    return gkd_source(cfg, step) if cfg.is_gkd else "opsd"


def keep_with_mix(passes: Sequence[bool], *, mix: float, seed: int) -> tuple[list[int], int]:
    """Indices of the items that pass, plus a seeded `mix` fraction of those that do not (dropping every one
    of them collapses entropy, "Rethinking OPD"). Returns (sorted kept indices, how many were mixed back)."""
    rejected = [i for i, ok in enumerate(passes) if not ok]
    n_back = round(mix * len(rejected))
    back = random.Random(f"select:{seed}").sample(rejected, n_back) if n_back else []
    return sorted([i for i, ok in enumerate(passes) if ok] + back), n_back


def _drop_too_long(records: list[TrainRecord], limit: int | None, counts: Counter) -> list[TrainRecord]:
    """Records whose student or teacher sequence exceeds the model's context are skipped (counted)."""
    if limit is None:
        return records
    fits = [r for r in records if max(len(r.student_ids), len(r.teacher_ids)) <= limit]
    if len(fits) < len(records):
        counts["too_long"] += len(records) - len(fits)
    return fits


# ---------------------------------------------------------------- inputs

def load_inputs(cfg, rank: int | None = None) -> list[Trajectory]:
    """Every trajectory of `--trajectories` (one or more logs); with `--rejects`, bad records are skipped and
    written there by process 0 alone (rank from accelerate's RANK when not given)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    trajs, _ = read_logs(cfg.trajectories, rejects=cfg.rejects, write_rejects=rank == 0)
    return trajs


# ---------------------------------------------------------------- OPSD: hinted examples

def build_opsd(cfg, tok, student_lm, teacher, *, rank: int = 0, world: int = 1, gather=None) -> tuple[list[TrainRecord], dict]:
    """Hinted examples with their hint effect (and top-k targets), filtered; plus the counts for data.json.

    Each of `world` processes measures its share; `gather(list) -> list of lists` collects them.
    """
    trajs = load_inputs(cfg, rank)
    critiques = read_critiques(cfg.critiques)  # the newest record per trajectory: a retried failure supersedes it
    examples, counts = build_examples(trajs, critiques, tok, placement=cfg.placement,
                                      span="step" if cfg.anchor else cfg.span,
                                      inline_tags=(cfg.inline_open, cfg.inline_close))
    for e in examples if cfg.anchor else []:  # the whole reply is the target; the error tokens weigh 1, the rest anchor
        e.meta["anchor"] = cfg.anchor
    limit = context_limit(cfg.model, tok)
    fits = [e for e in examples if limit is None or max(len(e.student_ids), len(e.teacher_ids)) <= limit]
    if len(fits) < len(examples):
        counts["too_long"] += len(examples) - len(fits)
    examples = fits
    mine = examples[rank::world]
    with teacher.model() as t_lm:
        measured = measure(t_lm, student_lm, mine, batch_size=cfg.batch_size, top_k=cfg.top_k if cfg.precompute else 0,
                           temperature=cfg.temperature, pad_id=tok.pad_token_id or 0)
    if cfg.span == "random":  # the control keeps what span=quote keeps: the filter reads the real error's tokens
        at_error, _ = build_examples(trajs, critiques, tok, placement=cfg.placement, span="quote",
                                     inline_tags=(cfg.inline_open, cfg.inline_close))
        at_error = [e for e in at_error if limit is None or max(len(e.student_ids), len(e.teacher_ids)) <= limit][rank::world]
        if [e.meta["trajectory_id"] for e in at_error] != [e.meta["trajectory_id"] for e in mine]:
            raise RuntimeError("span=random: the examples at the error do not pair with the random-span ones")
        with teacher.model() as t_lm:
            filtered = measure(t_lm, student_lm, at_error, batch_size=cfg.batch_size, pad_id=tok.pad_token_id or 0)
        measured = [replace(m, hint_effect=f.hint_effect, hint_effect_first=f.hint_effect_first,
                                        student_logprob=f.student_logprob) for m, f in zip(measured, filtered)]
    shares = gather([[(rank + world * j, m) for j, m in enumerate(measured)]]) if world > 1 else [list(enumerate(measured))]
    by_index = dict(pair for share in shares for pair in share)
    effects = [by_index[i].hint_effect for i in range(len(examples))]
    # keep the hints that lower the error tokens by more than --min-hint-effect; --select-prompts mixes
    # a fraction of the others back in
    keep, mixed_back = keep_with_mix([e < -cfg.min_hint_effect for e in effects],
                                     mix=cfg.select_mix if cfg.select_prompts else 0.0, seed=cfg.seed)
    records = [TrainRecord.from_example(examples[i], scores=by_index[i].scores(), teacher_topk=by_index[i].teacher_topk)
               for i in keep]
    report = {"critiques": len(critiques), "built": len(examples), "filtered_hint_effect": len(examples) - len(keep),
              "mixed_back": mixed_back, "kept": len(records),
              "skipped": {k: v for k, v in sorted(counts.items()) if k != "used"},
              "hint_effect_mean": sum(effects) / len(effects) if effects else None,
              "hint_lowers": sum(e < 0 for e in effects)}
    return records, report


# ---------------------------------------------------------------- GKD: prompt/reply records

def build_records(trajs: Sequence[Trajectory], tok, *, teacher_system: str = "") -> tuple[list[TrainRecord], Counter]:
    """One record per trajectory ending its last assistant message; counts of what was skipped."""
    records, counts = [], Counter()
    for t in trajs:
        last = max((i for i, m in enumerate(t.messages) if m["role"] == "assistant"), default=None)
        if last is None:
            counts["no_assistant"] += 1
            continue
        cut = Trajectory(t.id, t.messages[:last + 1], t.tools, t.meta)
        t_msgs, shift = with_system_text(cut.messages, teacher_system) if teacher_system.strip() else (cut.messages, 0)
        rs, rt = render(cut, tok), render(Trajectory(t.id, t_msgs, t.tools, t.meta), tok)
        s0, s1 = rs.body_spans[last][0], rs.turn_end(last)
        t0, t1 = rt.body_spans[last + shift][0], rt.turn_end(last + shift)
        if s1 <= s0 or rs.input_ids[s0:s1] != rt.input_ids[t0:t1]:
            counts["misaligned" if s1 > s0 else "empty_reply"] += 1
            continue
        records.append(TrainRecord(t.id, rs.input_ids[:s1], (s0, s1), rt.input_ids[:t1], (t0, t1), dict(t.meta),
                                   prompt=Prompt(t.messages[:last], t.tools)))
        counts["used"] += 1
    return records, counts


def build_gkd(cfg, tok, student_lm, teacher) -> tuple[list[TrainRecord], dict]:
    """GKD prompt/reply records, optionally selected on teacher-student top-k overlap; plus the counts."""
    trajs = load_inputs(cfg)
    records, counts = build_records(trajs, tok, teacher_system=cfg.teacher_system)
    records = _drop_too_long(records, context_limit(cfg.model, tok), counts)
    report = {"trajectories": len(trajs), "built": len(records),
              "skipped": {k: v for k, v in sorted(counts.items()) if k != "used"}}
    if cfg.select_prompts and records:  # every process scores all prompts (deterministic, so all agree)
        overlap = measure_overlap(teacher, student_lm, records, batch_size=cfg.batch_size, k=cfg.diag_top_k,
                                  temperature=cfg.temperature, pad_id=tok.pad_token_id or 0)
        keep, mixed_back = keep_with_mix([o >= cfg.select_overlap for o in overlap], mix=cfg.select_mix, seed=cfg.seed)
        report |= {"overlap_mean": sum(overlap) / len(overlap), "selected": len(keep) - mixed_back,
                   "mixed_back": mixed_back}
        records = [replace(records[i], scores={**records[i].scores, "overlap": overlap[i]}) for i in keep]
    report["kept"] = len(records)
    return records, report


def build_supervised(cfg, tok) -> tuple[list[TrainRecord], dict]:
    """mode=sft / reinforce: one record per trajectory, its last assistant reply the target; plus the counts.

    reinforce: each trajectory's `meta.reward` (a number; required) minus the mean reward of the replies
    that share its `meta.task_id` (the per-task baseline) is its advantage. Replies with advantage 0 (every
    reply of the task got the same reward: no signal) are dropped and counted.
    """
    trajs = load_inputs(cfg)
    records, counts = build_records(trajs, tok)
    records = _drop_too_long(records, context_limit(cfg.model, tok), counts)
    report = {"trajectories": len(trajs), "built": len(records)}
    if cfg.mode == "reinforce":
        rewards = []
        for r in records:
            x = r.meta.get("reward")
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise ValueError(f"{', '.join(cfg.trajectories)}: trajectory {r.id!r}: mode=reinforce needs a number in "
                                 f"meta.reward, got {x!r}")
            rewards.append(float(x))
        groups = [str(r.meta.get("task_id", r.id)) for r in records]
        adv = advantages(rewards, groups)
        counts["zero_advantage"] += sum(a == 0 for a in adv)
        report |= {"reward_mean": sum(rewards) / len(rewards) if rewards else None, "tasks": len(set(groups))}
        records = [replace(r, advantage=a) for r, a in zip(records, adv) if a != 0]
    report |= {"kept": len(records), "skipped": {k: v for k, v in sorted(counts.items()) if k != "used"}}
    return records, report


@torch.no_grad()
def measure_overlap(teacher, student_lm, records: list[TrainRecord], *, batch_size: int, k: int, temperature: float,
                    pad_id: int) -> list[float]:
    """Mean teacher-student top-k overlap over each record's target tokens (the selection score)."""
    dev = next(student_lm.parameters()).device
    out = []
    with eval_mode(student_lm):
        for i in range(0, len(records), batch_size):
            recs = records[i:i + batch_size]
            sb = collate([r.student_ids for r in recs], [r.student_span for r in recs], pad_id=pad_id)
            tb = collate([r.teacher_ids for r in recs], [r.teacher_span for r in recs], pad_id=pad_id)
            s_logits = span_logits(student_lm, sb.input_ids.to(dev), sb.attention_mask.to(dev), sb.batch_idx.to(dev),
                                   sb.pos.to(dev))
            ov_N = token_diagnostics(s_logits, teacher.logits(tb).to(dev), k=k, temperature=temperature)["overlap"]
            out += [x.mean().item() for x in ov_N.split(sb.lengths)]
    return out


# ---------------------------------------------------------------- sampled replies (student, teacher, cold start)

@torch.no_grad()
def sample_replies(lm, tok, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                   seed: int) -> list[list[int]]:
    """Sampled replies, closed with the end-of-turn id when the model ended its turn (never empty)."""
    with eval_mode(lm):
        res = generate_batch(lm, tok, prompts, max_new_tokens=max_new_tokens, stop_text=[None] * len(prompts),
                             temperature=temperature, seed=seed)
    eot = eot_ids(tok)[0]
    return [ids + [eot] if finish == "eos" or not ids else ids for ids, finish in res]


def advantages(rewards: Sequence[float], groups: Sequence) -> list[float]:
    """REINFORCE advantages with a per-prompt mean baseline: r_i − mean(r_j : group_j = group_i)."""
    sums, counts = Counter(), Counter()
    for r, g in zip(rewards, groups):
        sums[g] += r
        counts[g] += 1
    return [r - sums[g] / counts[g] for r, g in zip(rewards, groups)]


def reply_trajectory(rec: TrainRecord, text: str, token_ids: list[int]) -> Trajectory:
    """The sampled reply as a trajectory (prompt messages + the new assistant message), for a reward function."""
    calls, err = parse_calls(text)
    msg = {"role": "assistant", "content": text, "token_ids": token_ids} | ({"tool_calls": calls} if calls else {})
    prompt = rec.prompt or Prompt([])
    return Trajectory(rec.id, prompt.messages + [msg], prompt.tools, {**rec.meta, "parse_error": err})


def student_samples(micro: list[list[TrainRecord]], *, student, tok, cfg, seed: int,
                    reward_fn: RewardFn | None) -> tuple[list[list[TrainRecord]], Counter]:
    """Source `student`: fresh student samples on each record's prompt (GKD+RL: g samples each, with advantages)."""
    if cfg.rl_alpha < 1.0 and reward_fn is None:
        raise ValueError("rl_alpha < 1 needs a reward function: opsd.train.run.main(cfg, reward_fn=...)")
    prefill = tok(cfg.resolved_prefill(), add_special_tokens=False)["input_ids"] if cfg.resolved_prefill() else []
    eot = eot_ids(tok)[0]
    g = cfg.samples_per_prompt if cfg.rl_alpha < 1.0 else 1
    out, stats = [], Counter()
    with student.full_weights("student samples (GKD --lmbda > 0)") as lm, student.accelerator.autocast():
        for j, recs in enumerate(micro):
            recs = [r for r in recs for _ in range(g)]  # g samples of every prompt, adjacent
            replies = sample_replies(lm, tok, [r.prefixes()[0] + prefill for r in recs],
                                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.gen_temperature, seed=seed + j)
            new = [r.with_reply(reply, prefill) for r, reply in zip(recs, replies)]
            if cfg.rl_alpha < 1.0:
                bodies = [prefill + (reply[:-1] if reply and reply[-1] == eot else reply) for reply in replies]
                trajs = [reply_trajectory(r, tok.decode(b, skip_special_tokens=False), b) for r, b in zip(recs, bodies)]
                rewards = [float(x) for x in reward_fn(trajs)]
                adv = advantages(rewards, [i // g for i in range(len(recs))])
                new = [replace(rec, advantage=a) for rec, a in zip(new, adv)]
                stats["reward_sum"] += sum(rewards)
                stats["reward_n"] += len(rewards)
            out.append(new)
    stats["sampled_replies"] = sum(len(m) for m in out)
    return out, stats


def teacher_samples(micro: list[list[TrainRecord]], *, teacher, tok, cfg, seed: int) -> tuple[list[list[TrainRecord]], Counter]:
    """Sources `teacher` (seq-KD) and OPSD's cold start: the teacher continues its own (hinted/instructed) prompt."""
    prefill = tok(cfg.resolved_prefill(), add_special_tokens=False)["input_ids"] if cfg.is_gkd and cfg.resolved_prefill() else []
    out = []
    with teacher.model() as t_lm:
        for j, recs in enumerate(micro):
            replies = sample_replies(t_lm, tok, [r.prefixes()[1] + prefill for r in recs],
                                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.gen_temperature, seed=seed + j)
            out.append([r.with_reply(reply, prefill) for r, reply in zip(recs, replies)])
    return out, Counter(sampled_replies=sum(len(m) for m in out))


def source_records(source: str, micro: list[list[TrainRecord]], *, student, teacher, tok, cfg, seed: int,
                   reward_fn: RewardFn | None = None) -> tuple[list[list[TrainRecord]], Counter]:
    """This process's micro-batches of records for a step of `source` (see module docstring), and sampling stats."""
    if source in ("opsd", "dataset", "reinforce") or (source == "sft" and (cfg.is_gkd or cfg.is_supervised)
                                                       and not cfg.seq_kd):
        return micro, Counter()
    if source == "student":
        return student_samples(micro, student=student, tok=tok, cfg=cfg, seed=seed, reward_fn=reward_fn)
    return teacher_samples(micro, teacher=teacher, tok=tok, cfg=cfg, seed=seed)  # teacher, sft from samples
