"""GKD data for `opsd train`: prompt/reply records, the data source of each step, sampling, rewards.

    opsd train --trajectories data/sample_openai.jsonl --out runs/gkd --teacher external \\
        --teacher-model TEACHER_DIR --lmbda 0.5 --beta 0.5 --temperature 1.0 --max-steps 8

GKD (Agarwal et al., ICLR 2024) on trajectories: the prompt is everything before a trajectory's
last assistant message, the reply is that message (its end-of-turn token included), and the loss
is the token divergence on every reply token (span-only: no logits at prompt positions). Each
optimizer step draws its data source from (seed, step) alone, so resume stays exact:

- `sft`      the first `--cold-start-sft` steps: supervised (NLL) on reference replies, or on
             teacher samples (`--seq-kd`; in OPSD mode: the hinted teacher's continuation from the
             start of the error span);
- `student`  with probability `--lmbda`: fresh student samples on the batch's prompts
             (`opsd.rollout.generate_batch`), `--samples-per-prompt` each under GKD+RL;
- `teacher`  otherwise with `--seq-kd`: teacher samples (sequence-level KD);
- `dataset`  otherwise: the dataset replies;
- `opsd`     OPSD mode after the cold start: the hinted examples as they are.

A record is a dict with `student_ids`/`student_span` and `teacher_ids`/`teacher_span` (the same
reply tokens; the teacher's prompt may carry `--teacher-system`, which is context distillation),
plus, for GKD, the prompt ids and the prompt messages/tools/meta that a reward function needs.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Callable, Sequence

import torch

from opsd.render import render
from opsd.types import Trajectory

RewardFn = Callable[[list[Trajectory]], list[float]]  # one reward per sampled trajectory (injected by the CLI)
KINDS = ("sft", "student", "teacher", "dataset", "opsd")


def eot_id(tok) -> int:
    """The end-of-turn id that closes a reply (`<|im_end|>` for ChatML, else eos)."""
    t = tok.convert_tokens_to_ids("<|im_end|>")
    return t if isinstance(t, int) and t != tok.unk_token_id else tok.eos_token_id


def teacher_view(traj: Trajectory, system: str) -> Trajectory:
    """The teacher's copy of a trajectory: `system` appended to (or inserted as) its system message."""
    if not system.strip():
        return traj
    msgs = [dict(m) for m in traj.messages]
    if msgs and msgs[0]["role"] in ("system", "developer"):
        msgs[0]["content"] = (msgs[0].get("content") or "").rstrip() + "\n\n" + system.strip()
    else:
        msgs.insert(0, {"role": "system", "content": system.strip()})
    return Trajectory(traj.id, msgs, traj.tools, traj.meta)


def _reply_span(r, step: int) -> tuple[int, int]:
    """Body of message `step` plus its end-of-turn token."""
    b0, b1 = r.body_spans[step]
    return b0, (b1 + 1 if b1 < len(r.input_ids) and r.assistant_mask[b1] else b1)


def build_records(trajs: Sequence[Trajectory], tok, *, teacher_system: str = "") -> tuple[list[dict], Counter]:
    """One record per trajectory ending its last assistant message; counts of what was skipped."""
    records, counts = [], Counter()
    for t in trajs:
        last = max((i for i, m in enumerate(t.messages) if m["role"] == "assistant"), default=None)
        if last is None:
            counts["no_assistant"] += 1
            continue
        cut = Trajectory(t.id, t.messages[:last + 1], t.tools, t.meta)
        rs, rt = render(cut, tok), render(teacher_view(cut, teacher_system), tok)
        s0, s1 = _reply_span(rs, last)
        t0, t1 = _reply_span(rt, last + len(rt.body_spans) - len(rs.body_spans))
        if s1 <= s0 or rs.input_ids[s0:s1] != rt.input_ids[t0:t1]:
            counts["misaligned" if s1 > s0 else "empty_reply"] += 1
            continue
        records.append({"id": t.id, "student_ids": rs.input_ids[:s1], "student_span": [s0, s1],
                        "teacher_ids": rt.input_ids[:t1], "teacher_span": [t0, t1],
                        "messages": t.messages[:last], "tools": t.tools, "meta": t.meta})
        counts["used"] += 1
    return records, counts


def build_dataset(cfg, tok, lm, teacher) -> tuple[list[dict], dict]:
    """GKD prompt/reply records (`opsd.train.sources`), optionally selected on teacher-student top-k overlap; plus counts."""
    from opsd.io.trajectories import load_trajectories

    trajs = load_trajectories(cfg.trajectories)
    records, counts = build_records(trajs, tok, teacher_system=cfg.teacher_system)
    skipped = {k: v for k, v in sorted(counts.items()) if k != "used"}
    report = {"trajectories": len(trajs), "built": len(records), "skipped": skipped}
    if cfg.select_prompts and records:  # every process scores all prompts (deterministic, so all agree)
        overlap = measure_overlap(teacher, lm, records, batch_size=cfg.batch_size, k=cfg.diag_top_k,
                                  temperature=cfg.temperature, pad_id=tok.pad_token_id or 0)
        keep, mixed_back = select_indices([o >= cfg.select_overlap for o in overlap], mix=cfg.select_mix, seed=cfg.seed)
        report |= {"overlap_mean": sum(overlap) / len(overlap), "selected": len(keep) - mixed_back,
                   "mixed_back": mixed_back}
        records = [{**records[i], "overlap": overlap[i]} for i in keep]
    report["kept"] = len(records)
    return records, report


def prefixes(rec: dict) -> tuple[list[int], list[int]]:
    """Student and teacher ids before the target span: the prompts a new reply continues."""
    return rec["student_ids"][:rec["student_span"][0]], rec["teacher_ids"][:rec["teacher_span"][0]]


def with_reply(rec: dict, reply: list[int], prefill: list[int] = ()) -> dict:
    """`rec` with its target replaced by `prefill` (context, not trained on) + `reply` (the new target)."""
    s, t = prefixes(rec)
    s, t = s + list(prefill), t + list(prefill)
    rec = {k: v for k, v in rec.items() if k not in ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_target_logprobs", "advantage")}
    return {**rec, "student_ids": s + reply, "student_span": [len(s), len(s) + len(reply)],
            "teacher_ids": t + reply, "teacher_span": [len(t), len(t) + len(reply)]}


def step_kind(cfg, step: int) -> str:
    """The data source of optimizer step `step` (see module docstring); depends on (seed, step) only."""
    if step < cfg.cold_start_sft:
        return "sft"
    if not cfg.is_gkd:
        return "opsd"
    if random.Random(f"gkd:{cfg.seed}:{step}").random() < cfg.lmbda:
        return "student"
    return "teacher" if cfg.seq_kd else "dataset"


@torch.no_grad()
def sample_replies(lm, tok, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                   seed: int) -> list[list[int]]:
    """Sampled replies, closed with the end-of-turn id when the model ended its turn (never empty)."""
    from opsd.rollout.run import generate_batch

    was = lm.training
    lm.eval()
    try:
        res = generate_batch(lm, tok, prompts, max_new_tokens=max_new_tokens, stop_text=[None] * len(prompts),
                             temperature=temperature, seed=seed)
    finally:
        lm.train(was)
    eot = eot_id(tok)
    return [ids + [eot] if finish == "eos" or not ids else ids for ids, finish in res]


def advantages(rewards: Sequence[float], groups: Sequence[int]) -> list[float]:
    """REINFORCE advantages with a per-prompt mean baseline: r_i − mean(r_j : group_j = group_i)."""
    sums, counts = Counter(), Counter()
    for r, g in zip(rewards, groups):
        sums[g] += r
        counts[g] += 1
    return [r - sums[g] / counts[g] for r, g in zip(rewards, groups)]


def reply_trajectory(rec: dict, text: str, token_ids: list[int]) -> Trajectory:
    """The sampled reply as a trajectory (prompt messages + the new assistant message), for a reward function."""
    from opsd.rollout.run import parse_reply

    calls, err = parse_reply(text)
    msg = {"role": "assistant", "content": text, "token_ids": token_ids} | ({"tool_calls": calls} if calls else {})
    return Trajectory(rec["id"], rec["messages"] + [msg], rec["tools"], {**rec["meta"], "parse_error": err})


def make_step_records(kind: str, micro: list[list[dict]], *, student_lm, teacher, tok, cfg, seed: int,
                      reward_fn: RewardFn | None = None) -> tuple[list[list[dict]], dict]:
    """This process's micro-batches of records for a step of `kind`, and stats (rewards, sample counts).

    `micro` are the step's records as drawn from the dataset; `teacher` is an `opsd.train.teachers.Teacher`.
    """
    stats: dict = {}
    if kind in ("opsd", "dataset") or (kind == "sft" and cfg.is_gkd and not cfg.seq_kd):
        return micro, stats
    prefill = tok(cfg.gen_prefill, add_special_tokens=False)["input_ids"] if cfg.gen_prefill and cfg.is_gkd else []
    eot = eot_id(tok)
    out, rewards = [], []
    for j, recs in enumerate(micro):
        if kind == "student":
            g = cfg.samples_per_prompt if cfg.rl_alpha < 1.0 else 1
            recs = [r for r in recs for _ in range(g)]  # g samples of every prompt, adjacent
            replies = sample_replies(student_lm, tok, [prefixes(r)[0] + prefill for r in recs],
                                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.gen_temperature, seed=seed + j)
        else:  # teacher samples (seq-KD, cold start): the teacher continues its own (hinted / instructed) prompt
            with teacher.active() as t_lm:
                replies = sample_replies(t_lm, tok, [prefixes(r)[1] + prefill for r in recs],
                                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.gen_temperature,
                                         seed=seed + j)
        new = [with_reply(r, reply, prefill) for r, reply in zip(recs, replies)]
        if kind == "student" and cfg.rl_alpha < 1.0:
            if reward_fn is None:
                raise ValueError("rl_alpha < 1 needs a reward function: opsd.train.main(cfg, reward_fn=...)")
            body = [prefill + (reply[:-1] if reply and reply[-1] == eot else reply) for reply in replies]
            trajs = [reply_trajectory(r, tok.decode(b, skip_special_tokens=False), b) for r, b in zip(recs, body)]
            r_i = [float(x) for x in reward_fn(trajs)]
            groups = [i // cfg.samples_per_prompt for i in range(len(recs))]
            for rec, a in zip(new, advantages(r_i, groups)):
                rec["advantage"] = a
            rewards += r_i
        out.append(new)
    stats["sampled_replies"] = sum(len(m) for m in out)
    if rewards:
        stats["reward_sum"], stats["reward_n"] = sum(rewards), len(rewards)
    return out, stats


def select_indices(passes: Sequence[bool], *, mix: float, seed: int) -> tuple[list[int], int]:
    """Indices kept by prompt selection: all that pass, plus a seeded `mix` fraction of the others.

    Returns (sorted kept indices, how many were mixed back).
    """
    rejected = [i for i, ok in enumerate(passes) if not ok]
    n_back = round(mix * len(rejected))
    back = random.Random(f"select:{seed}").sample(rejected, n_back) if n_back else []
    return sorted([i for i, ok in enumerate(passes) if ok] + back), n_back


@torch.no_grad()
def measure_overlap(teacher, student_lm, records: list[dict], *, batch_size: int, k: int, temperature: float,
                    pad_id: int) -> list[float]:
    """Mean teacher-student top-k overlap over each record's target tokens (the selection score)."""
    from opsd.train.diagnostics import token_diagnostics
    from opsd.train.scoring import collate, span_logits

    dev = next(student_lm.parameters()).device
    was = student_lm.training
    student_lm.eval()
    out = []
    try:
        for i in range(0, len(records), batch_size):
            recs = records[i:i + batch_size]
            sb = collate([r["student_ids"] for r in recs], [tuple(r["student_span"]) for r in recs], pad_id=pad_id)
            tb = collate([r["teacher_ids"] for r in recs], [tuple(r["teacher_span"]) for r in recs], pad_id=pad_id)
            s_logits = span_logits(student_lm, sb.input_ids.to(dev), sb.attention_mask.to(dev), sb.batch_idx.to(dev),
                                   sb.pos.to(dev))
            ov_N = token_diagnostics(s_logits, teacher.logits(tb).to(dev), k=k, temperature=temperature)["overlap"]
            out += [x.mean().item() for x in ov_N.split(sb.lengths)]
    finally:
        student_lm.train(was)
    return out
