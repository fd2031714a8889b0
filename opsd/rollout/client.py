"""The openai backend: chat completions from any OpenAI-compatible server (vLLM, SGLang, llama.cpp).

    opsd rollout --tasks my_tasks.jsonl --backend openai --base-url http://localhost:8000/v1 \\
        --api-model Qwen/Qwen2.5-7B-Instruct --concurrency 32 --out rollouts.jsonl

The server renders the prompt with its own chat template and returns text (and native tool calls),
so these trajectories carry no token ids; for token-exact rollouts from a server that takes prompt
ids, use `--backend completions` (opsd.rollout.completions). Requests run with asyncio concurrency;
a failed request is written to the writer's error file (never with a secret) and retried next run.
"""
from __future__ import annotations

import asyncio
import os

from opsd.io.tasks import Task
from opsd.rollout.config import RolloutConfig


async def run_chat_async(cfg: RolloutConfig, todo: list[tuple[Task, int, str]], writer) -> None:
    """Ask the server for every (task, sample, key) in `todo`; `writer.reply` / `writer.error` record each."""
    from openai import AsyncOpenAI  # optional back-end, imported only when used

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
                writer.reply(task, k, rkey, prefill + (choice.message.content or ""), token_ids=None,
                             finish=choice.finish_reason or "stop", tool_calls=calls)
            except Exception as e:  # recorded (without any secret), retried next run
                writer.error(task, k, rkey, f"{type(e).__name__}: {str(e)[:300]}")

    try:
        await asyncio.gather(*(one(t, k, rk) for t, k, rk in todo))
    finally:
        await client.close()


def run_chat(cfg: RolloutConfig, todo: list[tuple[Task, int, str]], writer) -> None:
    asyncio.run(run_chat_async(cfg, todo, writer))
