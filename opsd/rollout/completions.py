"""Token-exact rollouts against an OpenAI-compatible server (vLLM, SGLang): opsd's ids in, the server's ids out.

    opsd rollout --backend completions --base-url http://127.0.0.1:8000/v1 --api-model round_0-3f2a9c1b7e \
        --model runs/loop/round_0/train/model --tasks bfcl:simple_python:train --out rollouts.jsonl

opsd renders each prompt itself (chat template, Hermes tools block, reply prefill) and sends the ids
to `/v1/completions` with `"return_token_ids": true`. The server must report the same prompt ids
(checked per reply); the ids it sampled are recorded in the assistant message (`token_ids`, prefill
included), exactly as the hf backend records them, so later stages score what the model produced.
`--model` names the tokenizer (the student's dir, or the base model); `--api-model` the served name.

Every trajectory's meta says how it was made:
- `api`: "completions" (token-exact) or "chat" (the server takes no prompt ids: chat completions with
  the server's own template, text only; reported once as a warning);
- `weights`: which weights answered, from the server's /v1/models before the first request:
  {"model", "adapter" (name or None for the base), "path", "hash" (sha256 of the files, when local)};
- `server`: the base URL, credentials masked (`?api-key=***`, `user:***@`).
A model the server does not list stops the stage before anything is written. Failed requests
(timeouts, a dead server) go to OUT.errors.jsonl and are retried by the next run; finished replies
are never asked for twice.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random

import httpx

from opsd.io.models import load_tokenizer
from opsd.io.records import ResumableJsonl
from opsd.io.tasks import Task
from opsd.redact import redact_url
from opsd.render import eot_ids, prompt_ids
from opsd.rollout.client import run_chat
from opsd.rollout.config import STOP_TEXT, RolloutConfig
from opsd.rollout.hf import expects_parallel
from opsd.rollout.writer import Writer
from opsd.serve.adapters import AdapterClient, served_weights
from opsd.types import ServerError

log = logging.getLogger(__name__)

RETRY_STATUS = (429, 500, 502, 503, 504)


class TokenMismatchError(RuntimeError):
    """The server tokenised or reported the prompt differently from opsd's rendering."""


def root_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base.removesuffix("/v1")


def completion_body(cfg: RolloutConfig, model: str, ids: list[int], *, stop: bool, sample: int) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "seed": cfg.seed + sample, "return_token_ids": True,
            "skip_special_tokens": False, "include_stop_str_in_output": True}
    if stop:
        body["stop"] = [STOP_TEXT]
    return body


def finish_reason(choice: dict, generated: list[int], eos: set[int]) -> str:
    """hf-backend names: eos (end of turn), stop (the stop text), length (budget)."""
    if choice.get("finish_reason") == "length":
        return "length"
    if choice.get("stop_reason") == STOP_TEXT or (choice.get("stop_reason") is None and generated and generated[-1] not in eos
                                                  and STOP_TEXT in (choice.get("text") or "")):
        return "stop"
    return "eos"


def parse_choice(resp: dict, sent_ids: list[int], eos: set[int]) -> tuple[list[int], str]:
    """(generated ids without a final end-of-turn id, finish reason) from a /v1/completions answer;
    TokenMismatchError when the server's prompt ids differ from the ids sent."""
    choice = resp["choices"][0]
    reported = choice.get("prompt_token_ids")
    if reported is None:
        raise TokenMismatchError("the server returned no prompt_token_ids (does it support return_token_ids?)")
    if list(reported) != list(sent_ids):
        first = next((i for i, (a, b) in enumerate(zip(reported, sent_ids)) if a != b), min(len(reported), len(sent_ids)))
        raise TokenMismatchError(f"server prompt ids differ from opsd's at position {first} "
                                 f"(server {len(reported)} ids, opsd {len(sent_ids)})")
    generated = list(choice.get("token_ids") or [])
    finish = finish_reason(choice, generated, eos)
    if generated and generated[-1] in eos:
        generated = generated[:-1]
    return generated, finish


async def _post_json(client: httpx.AsyncClient, url: str, body: dict, retries: int = 3) -> dict:
    """POST with retries on connection errors and 429/5xx (jittered backoff); timeouts are not retried."""
    for attempt in range(retries + 1):
        try:
            r = await client.post(url, json=body)
        except httpx.TimeoutException:
            raise
        except httpx.TransportError:
            if attempt == retries:
                raise
        else:
            if r.status_code not in RETRY_STATUS or attempt == retries:
                if r.status_code != 200:
                    raise httpx.HTTPStatusError(f"HTTP {r.status_code}: {r.text[:300]}", request=r.request, response=r)
                return r.json()
        await asyncio.sleep(min(8.0, 0.5 * 2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def probe_token_ids(cfg: RolloutConfig, model: str, ids: list[int]) -> bool:
    """Whether the server takes prompt ids on /v1/completions and returns token ids (one 1-token request)."""
    body = completion_body(cfg, model, ids, stop=False, sample=0) | {"max_tokens": 1}
    try:
        r = httpx.post(cfg.base_url.rstrip("/") + "/completions", json=body, timeout=max(cfg.timeout, 60.0))
    except httpx.HTTPError as e:
        raise ServerError(cfg.redact(f"{cfg.base_url}: cannot reach the server ({type(e).__name__}: {e})")) from None
    if r.status_code in (400, 404, 405, 422, 501):
        return False
    if r.status_code != 200:
        raise ServerError(cfg.redact(f"{cfg.base_url}/completions: HTTP {r.status_code}: {r.text[:300]}"))
    choice = (r.json().get("choices") or [{}])[0]
    return "token_ids" in choice and "prompt_token_ids" in choice


def run_completions(cfg: RolloutConfig, todo: list[tuple[Task, int, str]], out: ResumableJsonl, errors, bar) -> dict:
    """Roll out `todo` (task, sample, key) against cfg.base_url; returns the provenance written into meta."""
    tok = load_tokenizer(cfg.model)
    model = cfg.api_model or str(cfg.model)
    weights = served_weights(AdapterClient(root_url(cfg.base_url)), model)  # raises before anything is written
    prefill = cfg.resolved_prefill()
    prefill_ids = tok(prefill, add_special_tokens=False)["input_ids"] if prefill else []
    prompts = {key: prompt_ids(task.messages, task.tools, tok) + prefill_ids for task, _, key in todo}
    token_exact = probe_token_ids(cfg, model, next(iter(prompts.values()))) if todo else True
    meta = {"api": "completions" if token_exact else "chat", "weights": weights, "server": redact_url(cfg.base_url)}
    writer = Writer(cfg, out, errors, bar, meta)
    if not token_exact:
        log.warning("%s takes no prompt ids on /v1/completions: falling back to chat completions (NOT token-exact)",
                    redact_url(cfg.base_url))
        run_chat(cfg, todo, writer)
        return meta
    eos = set(eot_ids(tok, cfg.model))  # the hf backend's ids, generation config included: same replies
    url = cfg.base_url.rstrip("/") + "/completions"
    key_env = os.environ.get(cfg.api_key_env)
    headers = {"Authorization": f"Bearer {key_env}"} if key_env else {}

    async def main_async() -> None:
        sem = asyncio.Semaphore(cfg.concurrency)
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        async with httpx.AsyncClient(timeout=cfg.timeout, limits=limits, headers=headers) as client:
            async def one(task: Task, k: int, rkey: str) -> None:
                async with sem:
                    ids = prompts[rkey]
                    stop = cfg.stop_at_call and not expects_parallel(task)
                    try:
                        resp = await _post_json(client, url, completion_body(cfg, model, ids, stop=stop, sample=k))
                        gen_ids, finish = parse_choice(resp, ids, eos)
                        reply = prefill_ids + gen_ids
                        text = tok.decode(reply, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                        writer.reply(task, k, rkey, text, token_ids=reply, finish=finish)
                    except Exception as e:  # recorded (no secrets in it), retried on the next run
                        writer.error(task, k, rkey, f"{type(e).__name__}: {str(e)[:300]}")

            await asyncio.gather(*(one(t, k, rk) for t, k, rk in todo))

    asyncio.run(main_async())
    return meta
