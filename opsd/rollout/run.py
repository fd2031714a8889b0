"""On-policy rollouts: sample student replies on tasks and write trajectories (resumable JSONL).

    opsd rollout --tasks bfcl:simple_python:train --limit 64 --out runs/r/rollouts.jsonl
    opsd rollout --tasks my_tasks.jsonl --backend openai --base-url http://localhost:8000/v1 \
        --api-model Qwen/Qwen2.5-7B-Instruct --concurrency 32 --out rollouts.jsonl

Backends:
- `hf` (default): our own batched decode loop on transformers. Prompts are length-sorted and
  left-padded; each row stops at `</tool_call>` (single-call tasks) or end of turn and is
  dropped from the batch (and its KV cache) as soon as it finishes, so short replies do not pay
  for long ones. A reply prefill (default `<tool_call>\\n` for the embedded model, which makes
  no calls without it) is appended to the prompt. The exact generated ids are recorded in the
  assistant message (`token_ids`), so later stages score exactly what the model produced.
- `openai`: any OpenAI-compatible server (vLLM, SGLang, llama.cpp), with asyncio concurrency.

Each output line is a trajectory whose last message is the student's reply, with `meta.task_id`,
`meta.ground_truth`, `meta.finish_reason` and `meta.parse_error` (unparsable replies are kept
with their raw text, never dropped). Lines are keyed by task, sample and config; a killed run
resumes where it stopped. Items whose generation raised go to OUT.errors.jsonl and are retried
on the next run.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from opsd.io.records import ResumableJsonl
from opsd.io.tasks import Task, load_tasks
from opsd.io.trajectories import parse_tool_call_text
from opsd.rollout import multi_turn
from opsd.rollout.config import STOP_TEXT, RolloutConfig, prefill_arg

log = logging.getLogger(__name__)


def _expects_parallel(task: Task) -> bool:
    return "parallel" in str(task.meta.get("category", "")) or len(task.ground_truth or []) > 1


def parse_reply(text: str) -> tuple[list[dict], str | None]:
    """Tool calls in a raw reply, and a parse error (None when every call parsed)."""
    _, calls, errors = parse_tool_call_text(text)
    opened = text.count("<tool_call>")
    if errors:
        return calls, "; ".join(errors)
    if opened > len(calls):
        return calls, "unterminated <tool_call> block (reply cut off)"
    if not calls:
        return calls, "no tool call in reply"
    return calls, None


def make_trajectory(task: Task, sample: int, content: str, *, token_ids: list[int] | None, finish: str,
                    cfg: RolloutConfig, key: str, tool_calls: list[dict] | None = None) -> dict:
    calls, err = parse_reply(content)
    if tool_calls:  # native calls from an OpenAI-compatible server
        calls, err = tool_calls, None
    msg: dict = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = calls
    if token_ids is not None:
        msg["token_ids"] = token_ids
    meta = {"task_id": task.id, "sample": sample, "model": str(cfg.model), "backend": cfg.backend,
            "finish_reason": finish, "parse_error": err, "rollout_config": cfg.hash(), **task.meta, **cfg.extra_meta}
    if task.ground_truth is not None:
        meta["ground_truth"] = task.ground_truth
    return {"id": f"{task.id}#s{sample}", "key": key, "messages": task.messages + [msg], "tools": task.tools,
            "meta": meta}


# ----------------------------------------------------------------------------- hf backend
def _sample(logits_BV: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs = (logits_BV.float() / temperature).softmax(-1)  # (B, V)
    if top_p < 1:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p
        sp[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, stop_text: list[str | None],
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[tuple[list[int], str]]:
    """Decode a batch of prompts; returns (generated ids without the end-of-turn id, finish reason) per row.

    Rows are left-padded; a row leaves the batch (and the KV cache) as soon as it emits an
    end-of-turn id or its stop text, so finished rows cost nothing afterwards.
    """
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    eos = {tokenizer.eos_token_id} | ({cfg_eos} if isinstance(cfg_eos, int) else set(cfg_eos or []))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        eos.add(im_end)
    eos.discard(None)
    B, L = len(prompts), max(len(p) for p in prompts)
    ids_BL = torch.full((B, L), pad, dtype=torch.long)
    attn_BL = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BL[b, L - len(p):] = torch.tensor(p)
        attn_BL[b, L - len(p):] = 1
    ids_BL, attn_BL = ids_BL.to(dev), attn_BL.to(dev)
    pos_BL = (attn_BL.cumsum(-1) - 1).clamp(min=0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cache = DynamicCache()
    out = model(input_ids=ids_BL, attention_mask=attn_BL, position_ids=pos_BL, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    logits_BV = out.logits[:, -1]
    rows = list(range(B))  # original row index of each active row
    outs: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    last_pos = pos_BL[:, -1]
    for _ in range(max_new_tokens):
        nxt = _sample(logits_BV, temperature, top_p, gen).cpu()
        keep = []
        for j, r in enumerate(rows):
            t = int(nxt[j])
            if t in eos:
                finish[r] = "eos"
                continue
            outs[r].append(t)
            st = stop_text[r]
            if st and st in tokenizer.decode(outs[r][-12:], skip_special_tokens=False):
                finish[r] = "stop"
                continue
            keep.append(j)
        if not keep or len(outs[rows[keep[0]]]) >= max_new_tokens:
            break
        if len(keep) < len(rows):
            idx = torch.tensor(keep, device=dev)
            cache.batch_select_indices(idx)
            attn_BL, last_pos, nxt = attn_BL[idx], last_pos[idx], nxt[keep]
            rows = [rows[j] for j in keep]
        attn_BL = torch.cat([attn_BL, attn_BL.new_ones((len(rows), 1))], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=nxt.to(dev)[:, None], attention_mask=attn_BL, position_ids=last_pos[:, None],
                    past_key_values=cache, use_cache=True)
        logits_BV = out.logits[:, -1]
    return [(outs[b], finish[b]) for b in range(B)]


def _run_hf(cfg: RolloutConfig, todo: list[tuple[Task, int, str]], out: ResumableJsonl, errors, bar) -> None:
    from opsd.io import models
    from opsd.render import prompt_ids

    model, tok = models.load(cfg.model, device=cfg.device)
    prefill = cfg.resolved_prefill()
    prefill_ids = tok(prefill, add_special_tokens=False)["input_ids"] if prefill else []
    items = [(task, k, key, prompt_ids(task.messages, task.tools, tok)) for task, k, key in todo]
    items.sort(key=lambda it: -len(it[3]))  # length-sorted: little padding, longest first
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i:i + cfg.batch_size]
        try:
            res = generate_batch(
                model, tok, [p + prefill_ids for *_, p in chunk], max_new_tokens=cfg.max_new_tokens,
                stop_text=[STOP_TEXT if cfg.stop_at_call and not _expects_parallel(t) else None for t, *_ in chunk],
                temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + i)
        except Exception as e:  # recorded, retried on the next run
            for task, k, key, _ in chunk:
                errors.write(json.dumps({"key": key, "task_id": task.id, "sample": k, "error": repr(e)}) + "\n")
            errors.flush()
            bar.update(len(chunk))
            continue
        for (task, k, key, _), (gen_ids, finish) in zip(chunk, res):
            ids = prefill_ids + gen_ids
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(make_trajectory(task, k, text, token_ids=ids, finish=finish, cfg=cfg, key=key))
        bar.update(len(chunk))


# ----------------------------------------------------------------------------- openai backend
async def _run_openai_async(cfg: RolloutConfig, todo, out: ResumableJsonl, errors, bar) -> None:
    from openai import AsyncOpenAI

    key = os.environ.get(cfg.api_key_env) or "EMPTY"
    client = AsyncOpenAI(base_url=cfg.base_url, api_key=key, max_retries=5, timeout=cfg.timeout)
    sem = asyncio.Semaphore(cfg.concurrency)
    prefill = cfg.resolved_prefill()

    async def one(task: Task, k: int, rkey: str) -> None:
        async with sem:
            msgs = list(task.messages) + ([{"role": "assistant", "content": prefill}] if prefill else [])
            try:
                resp = await client.chat.completions.create(
                    model=cfg.api_model or str(cfg.model), messages=msgs, tools=task.tools or None,
                    temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                    seed=cfg.seed + k)
                choice = resp.choices[0]
                calls = [{"id": c.id or f"call_{j}", "type": "function",
                          "function": {"name": c.function.name, "arguments": c.function.arguments}}
                         for j, c in enumerate(choice.message.tool_calls or [])]
                text = prefill + (choice.message.content or "")
                out.append(make_trajectory(task, k, text, token_ids=None, finish=choice.finish_reason or "stop",
                                           cfg=cfg, key=rkey, tool_calls=calls))
            except Exception as e:  # recorded (without any secret), retried next run
                errors.write(json.dumps({"key": rkey, "task_id": task.id, "sample": k,
                                         "error": f"{type(e).__name__}: {str(e)[:300]}"}) + "\n")
                errors.flush()
            bar.update(1)

    try:
        await asyncio.gather(*(one(t, k, rk) for t, k, rk in todo))
    finally:
        await client.close()


def load_rollouts(cfg: RolloutConfig) -> list:
    """The trajectories `main(cfg)` wrote for exactly this config (the file may hold other runs')."""
    from opsd.io.records import read_jsonl
    from opsd.types import Trajectory

    suffix = "@" + cfg.hash()
    return [Trajectory.from_dict(r) for r in read_jsonl(cfg.out) if r.get("key", "").endswith(suffix)]


def main(cfg: RolloutConfig) -> dict:
    """Run the rollout stage; returns a summary dict (also printed by the CLI)."""
    tasks = load_tasks(cfg.tasks, limit=cfg.limit)
    chash = cfg.hash()
    out = ResumableJsonl(cfg.out)
    todo = [(t, k, f"{t.id}#s{k}@{chash}") for t in tasks for k in range(cfg.samples)]
    todo = [x for x in todo if x[2] not in out]
    errors_path = Path(str(cfg.out) + ".errors.jsonl")
    t0 = time.time()
    with open(errors_path, "w", encoding="utf-8") as errors, \
            tqdm(total=len(todo), desc="rollout", unit="reply", disable=None, file=sys.stderr) as bar:
        if todo:
            random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
            todo_single, todo_multi = multi_turn.split_todo(todo)  # multi-turn tasks: the agent loop
            if todo_multi:
                multi_turn.run(cfg, todo_multi, out, errors, bar)
            if todo_single and cfg.backend == "hf":
                _run_hf(cfg, todo_single, out, errors, bar)
            elif todo_single and cfg.backend == "completions":  # token-exact server rollouts
                from opsd.rollout.completions import run_completions

                run_completions(cfg, todo_single, out, errors, bar)
            elif todo_single:
                asyncio.run(_run_openai_async(cfg, todo_single, out, errors, bar))
    n_err = sum(1 for _ in open(errors_path, encoding="utf-8"))
    if not n_err:
        errors_path.unlink()
    mine = [r for r in out.done.values() if r["key"].endswith("@" + chash)]
    out.close()
    parse_fail = sum(1 for r in mine if r["meta"].get("parse_error"))
    summary = {"tasks": len(tasks), "samples": cfg.samples, "written_now": len(todo) - n_err,
               "total": len(mine), "errors": n_err, "parse_errors": parse_fail, "seconds": round(time.time() - t0, 1),
               "out": str(cfg.out)}
    return summary


def add_arguments(p) -> None:
    d = RolloutConfig()
    p.add_argument("--tasks", required=True, help="bfcl:CATEGORY[,CAT...][:train|:heldout|:all] or a task JSONL file")
    p.add_argument("--out", required=True, help="output JSONL (appended; rerun to resume)")
    p.add_argument("--model", default=d.model, help="model name or path (default: %(default)s)")
    p.add_argument("--backend", default=d.backend, choices=["hf", "openai"])
    p.add_argument("--samples", type=int, default=d.samples, help="samples per task")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--limit", type=int, default=None, help="first N tasks (deterministic order)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--prefill", default=None, help="reply prefill text (default: '<tool_call>\\n' for the embedded model)")
    p.add_argument("--no-stop-at-call", dest="stop_at_call", action="store_false",
                   help="do not stop at the first </tool_call>")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None)
    p.add_argument("--base-url", default=None, help="openai backend: server URL, e.g. http://localhost:8000/v1")
    p.add_argument("--api-model", default=None, help="openai backend: model name on the server")
    p.add_argument("--api-key-env", default=d.api_key_env, help="env var holding the API key")
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--timeout", type=float, default=d.timeout)


def config_from_args(args) -> RolloutConfig:
    names = set(RolloutConfig.__dataclass_fields__)
    return RolloutConfig(**{k: v for k, v in vars(args).items() if k in names and k != "extra_meta"})


def run(args) -> int:
    args.prefill = prefill_arg(args.prefill)
    summary = main(config_from_args(args))
    print(json.dumps(summary))
    return 1 if summary["errors"] else 0


__all__ = ["RolloutConfig", "main", "load_rollouts", "generate_batch", "parse_reply", "prefill_arg"]
