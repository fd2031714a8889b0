"""The LLM critic's options, written once: fields, help texts, defaults and checks.

    from opsd_critic.llm_config import LLMConfig
    LLMConfig(base_url="http://localhost:8000/v1", model="Qwen/Qwen2.5-7B-Instruct")   # ValueError names a bad field

`opsd.critique.config.CriticConfig` inherits these fields (the `--critic.base-url`, `--critic.model`, ... flags) and
these checks, and `opsd.critique.run.build_critic` passes them on as an `LLMConfig` (`LLMConfig.of`). The API key is
NOT here: it is read from the environment variable `api_key_env`. This module does not import openai or jinja2
(`opsd_critic.llm` does), so a Config that nests the options stays cheap to import.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from opsd_critic.validate import DEFAULT_MAX_HINT_TOKENS
from opsd.redact import redact_url, redacted_repr

MIN_HINT_TOKENS = 16  # rule critics' shortest hints (the fallback, 9) must fit; a hint below ~16 says nothing


@dataclass(repr=False)
class LLMConfig:
    """Settings of the LLM critic (see module docstring); `max_hint_tokens` is every critic's hint limit."""

    base_url: str = field(default="https://api.openai.com/v1", metadata={
        "help": "llm: OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp ...); a ?api-key=... query is sent with "
                "every request and never printed"})
    model: str = field(default="", metadata={"help": "llm: model name on that endpoint (required for llm critics)"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "llm: environment variable holding the API key (the key itself is never a flag, logged or written)"})
    prompt: str | None = field(default=None, metadata={
        "help": "llm: custom Jinja2 prompt template (None: prompts/critic/locate_error.j2)"})
    timeout: float = field(default=300.0, metadata={"help": "llm: seconds per request (a small model on a CPU server "
                                                                  "needs minutes under concurrent requests)"})
    max_attempts: int = field(default=5, metadata={"help": "llm: transport attempts per request (1 = no retry)"})
    backoff: float = field(default=1.0, metadata={"help": "llm: first retry wait in seconds (doubles, plus jitter)"})
    max_wait: float = field(default=30.0, metadata={"help": "llm: cap on one retry wait, Retry-After included"})
    max_reasks: int = field(default=2, metadata={"help": "llm: re-asks of an invalid reply, with the reason"})
    temperature: float = field(default=0.0, metadata={"help": "llm: sampling temperature"})
    max_tokens: int = field(default=384, metadata={"help": "llm: completion budget per reply (the enforced reply "
                                                                "schema bounds a reply to about 250 tokens)"})
    structured: bool = field(default=True, metadata={
        "help": "llm: ask for response_format json_schema (falls back to JSON in text if the server rejects it)"})
    max_hint_tokens: int = field(default=DEFAULT_MAX_HINT_TOKENS, metadata={
        "help": f"hint length limit in approximate tokens (validation; at least {MIN_HINT_TOKENS})"})

    def __post_init__(self) -> None:
        self.check("llm")

    def check(self, critic: str | None) -> None:
        """Raise ValueError("FIELD: why") for the first bad option. `critic`: the name of the LLM critic these
        options are for (it needs a model name), or None for a critic that asks no LLM."""
        if critic and not self.model:
            raise ValueError(f"model: the {critic} critic needs the model name on the endpoint (--critic.model M)")
        if not re.match(r"^https?://[^/\s]+", self.base_url or ""):
            raise ValueError(f"base_url: must be an http(s) URL such as http://localhost:8000/v1, got "
                             f"{redact_url(self.base_url or '')!r}")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.api_key_env or ""):
            raise ValueError(f"api_key_env: must be the NAME of an environment variable (not the key), "
                             f"got {self.api_key_env!r}")
        if self.prompt is not None and not Path(self.prompt).is_file():
            raise ValueError(f"prompt: template {self.prompt!r} is not a file")
        for name in ("timeout", "backoff", "max_wait"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0 seconds, got {getattr(self, name)}")
        for name, low in (("max_attempts", 1), ("max_reasks", 0), ("max_tokens", 1), ("max_hint_tokens", MIN_HINT_TOKENS)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: must be >= {low}, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")

    @classmethod
    def of(cls, options: LLMConfig) -> LLMConfig:
        """The LLM options of `options` (e.g. a CriticConfig, which adds the critic's name and run settings) as a
        plain LLMConfig: the fields the LLM critic hashes into its record keys, nothing else."""
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})

    def __repr__(self) -> str:  # a key in base_url (?api-key=..., user:key@) never shows, in any message
        return redacted_repr(self)
