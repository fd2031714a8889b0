"""Multi-turn rollouts: the agent loop over BFCL's simulated environments.

    opsd rollout --tasks bfcl:multi_turn_base:train --limit 8 --out runs/mt/rollouts.jsonl
    # opsd.rollout.run.main sends every multi-turn task here; no extra flag is needed

One episode per task and sample:

1. the environment is built from the installed BFCL data by the task's `bfcl_id` (never from a
   log): only the simulated classes of `opsd.io.tasks.bfcl_env` run, in-process, and only the
   functions declared so far are callable;
2. each user turn is appended; the model replies (a step); every tool call it makes is executed
   in the environment and its result appended as a `tool` message; the model replies again; the
   turn ends when a reply holds no parseable call (as BFCL: a reply it cannot decode ends the
   turn). Then the next scripted user turn follows;
3. caps: `max_steps_per_turn` replies per turn (a turn that is still calling at the cap ends the
   episode, as BFCL's force-quit; `meta.finish_reason` = `max_steps`), `episode_seconds` of wall
   time per episode (`time_limit`), the model's context (`context_full`), `call_seconds` per tool
   call, and `max_result_chars` per tool result shown to the model (the rest is cut and marked).

The reply prefill (`<tool_call>\\n` for the embedded model, which makes no calls without it) is
forced on the first reply of each user turn only (`prefill_steps="turn_start"`, the default):
forced on every reply, the model could never end a turn. Every assistant message keeps its exact
generated `token_ids` and its `prefill`; a turn's replies are decoded with the KV cache of the
conversation so far (the rendering is prefix-stable, so only new tokens are encoded).

A trajectory's `meta.multi_turn` adds to the task's: `turn_starts` (index of each played turn's
first user message), `turns_played`, `steps` (assistant replies) and `seconds`.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import zlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from opsd.io import models
from opsd.io.tasks import Task
from opsd.io.tasks import bfcl_multi_turn as mt
from opsd.io.trajectories import parse_tool_call_text
from opsd.render import eot_ids, prompt_ids

PREFILL_STEPS = ("turn_start", "every_step", "never")
FINISH_REASONS = ("done", "max_steps", "time_limit", "context_full")


@dataclass
class EpisodeLimits:
    max_steps_per_turn: int = 8  # BFCL allows 20; its ground truth has at most 7 calls in a turn
    episode_seconds: float = 600.0
    call_seconds: float = 10.0
    max_result_chars: int = 2000
    prefill_steps: str = "turn_start"

    def __post_init__(self) -> None:
        if self.max_steps_per_turn < 1:
            raise ValueError(f"max_steps_per_turn: must be >= 1, got {self.max_steps_per_turn}")
        if self.episode_seconds <= 0 or self.call_seconds <= 0:
            raise ValueError("episode_seconds, call_seconds: must be > 0")
        if self.max_result_chars < 100:
            raise ValueError(f"max_result_chars: must be >= 100, got {self.max_result_chars}")
        if self.prefill_steps not in PREFILL_STEPS:
            raise ValueError(f"prefill_steps: must be one of {', '.join(PREFILL_STEPS)}, got {self.prefill_steps!r}")


def is_multi_turn_task(task: Task) -> bool:
    return mt.is_multi_turn(task.meta)


def parse_step(text: str) -> tuple[list[dict], str | None]:
    """Tool calls of one reply and a parse error (None when every opened call parsed; no call is not an error
    here: it ends the turn)."""
    _, calls, errors = parse_tool_call_text(text)
    if errors:
        return calls, "; ".join(errors)
    if text.count("<tool_call>") > len(calls):
        return calls, "unterminated <tool_call> block (reply cut off)"
    return calls, None


def clip_result(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"... [{len(text) - max_chars} more characters cut]"


# ----------------------------------------------------------------------------- hf decoding with a kept cache
def sample_next(logits_V: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(logits_V.argmax())
    probs = (logits_V.float() / temperature).softmax(-1)  # (V,)
    if top_p < 1:
        sp, si = probs.sort(descending=True)
        sp[sp.cumsum(-1) - sp > top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return int(torch.multinomial(probs, 1, generator=gen))


class CachedDecoder:
    """Greedy/sampled decoding of one conversation, keeping the KV cache between its replies.

    `generate(prompt_ids)` reuses the cache for the longest common prefix with what it already
    encoded, so each reply only encodes the new messages.
    """

    def __init__(self, model, tok, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop_text: str | None = None, seed: int = 0):
        self.model, self.tok = model, tok
        self.max_new_tokens, self.temperature, self.top_p, self.stop_text = max_new_tokens, temperature, top_p, stop_text
        self.eos = set(eot_ids(tok, model))
        self.dev = next(model.parameters()).device
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.cache = None
        self.encoded: list[int] = []  # ids whose keys/values are in the cache

    def _feed(self, ids: list[int]) -> torch.Tensor:
        start = len(self.encoded)
        pos = torch.arange(start, start + len(ids), device=self.dev)[None]
        out = self.model(input_ids=torch.tensor([ids], device=self.dev), position_ids=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.encoded += ids
        return out.logits[0, -1]  # (V,)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int]) -> tuple[list[int], str]:
        """(generated ids without the end-of-turn id, finish reason: eos | stop | length)."""
        keep = 0
        for a, b in zip(self.encoded, prompt_ids[:-1]):  # at least one prompt token is fed again
            if a != b:
                break
            keep += 1
        if self.cache is None or keep == 0:
            self.cache, self.encoded = DynamicCache(), []
        elif keep < len(self.encoded):
            self.cache.crop(keep - len(self.encoded))  # negative: how many tokens to drop (every transformers version)
            self.encoded = self.encoded[:keep]
        logits_V = self._feed(prompt_ids[len(self.encoded):])
        out: list[int] = []
        for _ in range(self.max_new_tokens):
            t = sample_next(logits_V, self.temperature, self.top_p, self.gen)
            if t in self.eos:
                return out, "eos"
            out.append(t)
            if self.stop_text and self.stop_text in self.tok.decode(out[-12:], skip_special_tokens=False):
                return out, "stop"
            if len(out) >= self.max_new_tokens:
                break
            logits_V = self._feed([t])
        return out, "length"


# ----------------------------------------------------------------------------- the episode
@dataclass
class ReplyRequest:
    """What an episode needs next: one reply to `messages` (with `tools`), starting with `prefill`."""

    messages: list[dict]
    tools: list[dict]
    prefill: str


@dataclass
class Reply:
    """One model reply. `content` starts with the request's prefill; `tool_calls` are native calls from an
    OpenAI-compatible server (None: parse `content`). `finish`: eos | stop | length (or the server's reason)."""

    content: str
    token_ids: list[int] | None = None
    finish: str = "stop"
    tool_calls: list[dict] | None = None


def episode(task: Task, limits: EpisodeLimits, *, prefill: str = ""):
    """One BFCL multi-turn episode as a generator: it yields `ReplyRequest`s and is sent `Reply`s (or None:
    the prompt no longer fits the model's context). Returns (messages, meta additions).

    Tool calls run here, in the caller's thread (so the per-call timer works in the main thread).
    """
    info = task.meta["multi_turn"]
    item = mt.entry(info["bfcl_id"])
    env = mt.environment(item, call_seconds=limits.call_seconds)
    added = info.get("added_tools") or {}
    messages: list[dict] = []
    turn_starts: list[int] = []
    t0 = time.monotonic()
    finish, steps = "done", 0
    for k, turn in enumerate(info["turns"]):
        if str(k) in added:
            env.allow(t["function"]["name"] for t in added[str(k)])
        turn_starts.append(len(messages))
        messages += [dict(m) for m in turn]
        for step in range(limits.max_steps_per_turn):
            if time.monotonic() - t0 > limits.episode_seconds:
                finish = "time_limit"
                break
            pre = prefill if limits.prefill_steps == "every_step" or (
                limits.prefill_steps == "turn_start" and step == 0) else ""
            reply = yield ReplyRequest(messages, task.tools, pre)
            if reply is None:
                finish = "context_full"
                break
            steps += 1
            msg, calls = _assistant_message(reply, pre, k, step)
            messages.append(msg)
            if not calls:
                break  # the turn is over
            for c in calls:
                try:
                    args = json.loads(c["function"]["arguments"])
                except (json.JSONDecodeError, TypeError):
                    args = None
                result = env.call(c["function"]["name"], args)
                messages.append({"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"],
                                 "content": clip_result(result, limits.max_result_chars)})
            if step == limits.max_steps_per_turn - 1:
                finish = "max_steps"  # still calling at the cap: BFCL force-quits the episode
        if finish != "done":
            if not any(m["role"] == "assistant" for m in messages[turn_starts[-1]:]):
                del messages[turn_starts.pop():]  # a turn the model never answered is not part of the episode
            break
    meta = {"turn_starts": turn_starts, "turns_played": len(turn_starts), "steps": steps,
            "seconds": round(time.monotonic() - t0, 2)}
    return messages, {"finish_reason": finish, "multi_turn": meta}


def _assistant_message(reply: Reply, pre: str, turn: int, step: int) -> tuple[dict, list[dict]]:
    content = reply.content
    if reply.tool_calls is not None:
        calls, err = [dict(c, function=dict(c["function"])) for c in reply.tool_calls], None
    else:
        calls, err = parse_step(content)
        if calls and reply.token_ids is None:  # no exact ids: keep the calls once, in `tool_calls`
            content = parse_tool_call_text(content)[0]
    for j, c in enumerate(calls):
        c["id"], c["type"] = f"call_{turn}_{step}_{j}", "function"
    msg: dict = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = calls
    if reply.token_ids is not None:
        msg["token_ids"] = reply.token_ids
    if pre:
        msg["prefill"] = pre
    msg["finish_reason"] = reply.finish
    if err:
        msg["parse_error"] = err
    return msg, calls


def play(task: Task, reply_fn, limits: EpisodeLimits, *, prefill: str = "") -> tuple[list[dict], dict]:
    """Run `episode` to the end with `reply_fn(ReplyRequest) -> Reply | None`."""
    gen = episode(task, limits, prefill=prefill)
    try:
        req = next(gen)
        while True:
            req = gen.send(reply_fn(req))
    except StopIteration as stop:
        return stop.value


def episode_seed(seed: int, task_id: str, sample: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{task_id}#{sample}".encode())) % 2**31


def limits_from(cfg) -> EpisodeLimits:
    """Episode caps from a RolloutConfig (fields it lacks keep their defaults)."""
    names = ("max_steps_per_turn", "episode_seconds", "prefill_steps")
    return EpisodeLimits(**{n: getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None})


def record(cfg, task: Task, sample: int, key: str, messages: list[dict], extra: dict) -> dict:
    """The output line of one episode (same shape as a single-turn rollout's)."""
    meta = {"task_id": task.id, "sample": sample, "model": str(cfg.model), "backend": cfg.backend,
            "finish_reason": extra["finish_reason"], "rollout_config": cfg.hash(), **task.meta,
            **getattr(cfg, "extra_meta", {})}
    meta["multi_turn"] = {**task.meta["multi_turn"], **extra["multi_turn"]}
    meta["parse_errors"] = sum(1 for m in messages if m.get("parse_error"))
    return {"id": f"{task.id}#s{sample}", "key": key, "messages": messages, "tools": task.tools, "meta": meta}


def split_todo(todo: list) -> tuple[list, list]:
    """(single-turn items, multi-turn items) of a rollout's [(task, sample, key)]."""
    multi = [x for x in todo if is_multi_turn_task(x[0])]
    return [x for x in todo if not is_multi_turn_task(x[0])], multi


def run(cfg, todo: list[tuple[Task, int, str]], out, errors, bar) -> None:
    """Play every (task, sample, key) of `todo` with cfg's backend; each finished episode is appended to `out`,
    a failed one written to `errors` (retried on the next run)."""
    if cfg.backend == "hf":
        _run_hf(cfg, todo, out, errors, bar)
    elif cfg.backend == "completions":
        for task, k, key in todo:
            _error(errors, key, task, k, ValueError("multi-turn tasks run with the hf or openai backend, not completions"))
            bar.update(1)
    else:
        asyncio.run(_run_openai(cfg, todo, out, errors, bar))


def _error(errors, key: str, task: Task, k: int, e: Exception) -> None:
    errors.write(json.dumps({"key": key, "task_id": task.id, "sample": k,
                             "error": f"{type(e).__name__}: {str(e)[:300]}"}) + "\n")
    errors.flush()


def _run_hf(cfg, todo, out, errors, bar) -> None:
    limits = limits_from(cfg)
    precision = getattr(cfg, "precision", None)
    bf16 = bool(precision) and models.resolve_precision(precision, cfg.device) == "bf16"
    model, tok = models.load(cfg.model, device=cfg.device, dtype=torch.bfloat16 if bf16 else None)
    prefill = cfg.resolved_prefill()
    max_context = getattr(model.config, "max_position_embeddings", None) or 10**9
    for task, k, key in todo:
        dec = CachedDecoder(model, tok, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, stop_text="</tool_call>" if cfg.stop_at_call else None,
                            seed=episode_seed(cfg.seed, task.id, k))

        def reply(req: ReplyRequest, dec: CachedDecoder = dec) -> Reply | None:
            pre_ids = tok(req.prefill, add_special_tokens=False)["input_ids"] if req.prefill else []
            ids = prompt_ids(req.messages, req.tools, tok) + pre_ids
            if len(ids) + cfg.max_new_tokens > max_context:
                return None
            gen, finish = dec.generate(ids)
            text = tok.decode(pre_ids + gen, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            return Reply(text, pre_ids + gen, finish)

        try:
            messages, extra = play(task, reply, limits, prefill=prefill)
        except Exception as e:  # recorded, retried on the next run
            _error(errors, key, task, k, e)
        else:
            out.append(record(cfg, task, k, key, messages, extra))
        bar.update(1)


_API_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


async def _run_openai(cfg, todo, out, errors, bar) -> None:
    """Episodes concurrently against an OpenAI-compatible server; tool calls run in this (main) thread."""
    from openai import AsyncOpenAI  # only the openai backend needs it (0.6 s to import)


    limits = limits_from(cfg)
    client = AsyncOpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY", max_retries=5,
                         timeout=cfg.timeout)
    sem = asyncio.Semaphore(cfg.concurrency)
    prefill = cfg.resolved_prefill()

    async def ask(req: ReplyRequest, seed: int) -> Reply:
        msgs = [{k: v for k, v in m.items() if k in _API_KEYS} for m in req.messages]
        if req.prefill:
            msgs.append({"role": "assistant", "content": req.prefill})
        async with sem:
            resp = await client.chat.completions.create(
                model=cfg.api_model or str(cfg.model), messages=msgs, tools=req.tools or None,
                temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=seed)
        choice = resp.choices[0]
        native = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                "arguments": c.function.arguments}}
                  for c in choice.message.tool_calls or []]
        return Reply(req.prefill + (choice.message.content or ""), None, choice.finish_reason or "stop",
                     native or None)

    async def one(task: Task, k: int, key: str) -> None:
        gen = episode(task, limits, prefill=prefill)
        try:
            req = next(gen)
            while True:
                req = gen.send(await ask(req, cfg.seed + k))
        except StopIteration as stop:
            out.append(record(cfg, task, k, key, *stop.value))
        except Exception as e:  # recorded (without any secret), retried on the next run
            _error(errors, key, task, k, e)
        bar.update(1)

    try:
        await asyncio.gather(*(one(t, k, key) for t, k, key in todo))
    finally:
        await client.close()
