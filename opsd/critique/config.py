"""`CriticConfig` (which critic, every LLM option) and `CritiqueConfig` (`opsd critique`).

Flags and YAML are generated from these fields; eval, demo and loop nest `CriticConfig` as
`critic`, so every option is spelled the same everywhere (`--critic.name llm --critic.model M`).

    from opsd.critique.config import CriticConfig, CritiqueConfig
    CritiqueConfig(inputs=["logs.jsonl"], out="critiques.jsonl",
                   critic=CriticConfig(name="llm", base_url="http://localhost:8000/v1", model="Qwen/Qwen2.5-7B-Instruct"))

This module imports nothing heavy (no jinja2, openai or the `critic` package).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from opsd.redact import redact_url, redacted_repr

CRITIC_NAMES = ("schema", "reference", "llm", "schema+reference", "schema+llm")  # == critic.CRITICS (tested)
LLM_CRITICS = ("llm", "schema+llm")
RETRY_FAILED = ("transport", "none", "all")  # == critic.runner.RETRY_FAILED (tested)
MIN_HINT_TOKENS = 16  # rule critics' shortest hints (the fallback, 9) must fit; a hint below ~16 says nothing


@dataclass
class CriticConfig:
    name: Literal["schema", "reference", "llm", "schema+reference", "schema+llm"] = field(
        default="schema+reference", metadata={"help": "schema: calls against the tool schemas; reference: the first "
                                              "reply against meta.ground_truth (BFCL); llm: any OpenAI-compatible "
                                              "model; schema+reference: schema, then reference where there is ground "
                                              "truth; schema+llm: the LLM, with schema overruling an LLM 'ok'"})
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
    max_hint_tokens: int = field(default=64, metadata={
        "help": f"hint length limit in approximate tokens (validation; at least {MIN_HINT_TOKENS})"})
    all_errors: bool = field(default=False, metadata={
        "help": "rule critics: every error of the erroneous step (at most max_errors, in text order, one hint sentence "
                "each), not only the first; OPSD then trains on every error span in one hinted pass"})
    max_errors: int = field(default=3, metadata={"help": "all_errors: errors per critique at most"})
    concurrency: int = field(default=8, metadata={"help": "critiques in flight at once"})
    retry_failed: Literal["transport", "none", "all"] = field(default="transport", metadata={
        "help": "which failed records a rerun retries: transport (server errors that survived the retries), "
                "none, or all (bad replies too)"})
    max_transport_failure_share: float = field(default=0.1, metadata={
        "help": "the run fails (exit 1) when more than this share of its critiques failed on transport errors "
                "(they stay retryable); a run where every critique failed always fails"})

    def __post_init__(self) -> None:
        if self.name not in CRITIC_NAMES:
            raise ValueError(f"name: unknown critic {self.name!r}; choose one of {', '.join(CRITIC_NAMES)}")
        if self.name in LLM_CRITICS and not self.model:
            raise ValueError(f"model: the {self.name} critic needs the model name on the endpoint (--critic.model M)")
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
        for name, low in (("max_attempts", 1), ("max_reasks", 0), ("max_tokens", 1), ("concurrency", 1), ("max_errors", 1),
                          ("max_hint_tokens", MIN_HINT_TOKENS)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: must be >= {low}, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.retry_failed not in RETRY_FAILED:
            raise ValueError(f"retry_failed: must be one of {', '.join(RETRY_FAILED)}, got {self.retry_failed!r}")
        if not 0 <= self.max_transport_failure_share <= 1:
            raise ValueError(f"max_transport_failure_share: must be in [0, 1], got {self.max_transport_failure_share}")

    @property
    def uses_llm(self) -> bool:
        return self.name in LLM_CRITICS

    def __repr__(self) -> str:  # a key in base_url (?api-key=..., user:key@) never shows, in any message
        return redacted_repr(self)


@dataclass
class CritiqueConfig:
    inputs: Annotated[list[str], tyro.conf.arg(aliases=("--in",))] = field(default_factory=list, metadata={
        "help": "trajectory logs (openai JSONL, bare message lists, ShareGPT; see data/README.md)"})
    out: str = field(default="critiques.jsonl", metadata={
        "help": "append-only critique file (JSONL); rerunning resumes it"})
    limit: int | None = field(default=None, metadata={"help": "only the first N trajectories (None: all)"})
    rejects: str | None = field(default=None, metadata={
        "help": "write invalid input lines here, with the reason, and go on (None: stop at the first)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on stderr"})
    datasets_out: str = field(default="", metadata={
        "help": "also write the critiques (the newest per trajectory) as a `datasets` save_to_disk folder here when "
                "the stage ends (--out stays the resumable JSONL); '' = none"})
    critic: CriticConfig = field(default_factory=CriticConfig, metadata={"help": "the critic and its options"})

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"limit: must be >= 1 (or None for every trajectory), got {self.limit}")
        if not self.out:
            raise ValueError("out: give the critique file to write, e.g. runs/r/critiques.jsonl")
        if Path(self.out).is_dir():
            raise ValueError(f"out: {self.out} is a directory; give a file in it, e.g. {Path(self.out) / 'critiques.jsonl'}")
        if self.datasets_out and Path(self.datasets_out).is_file():
            raise ValueError(f"datasets_out: {self.datasets_out} is a file; a datasets output is a folder")
