"""`CriticConfig` (which critic, every LLM option) and `CritiqueConfig` (`opsd critique`).

Flags and YAML are generated from these fields; eval, demo and loop nest `CriticConfig` as
`critic`, so every option is spelled the same everywhere (`--critic.name llm --critic.model M`).

    from opsd.critique.config import CriticConfig, CritiqueConfig
    CritiqueConfig(inputs=["logs.jsonl"], out="critiques.jsonl",
                   critic=CriticConfig(name="llm", base_url="http://localhost:8000/v1", model="Qwen/Qwen2.5-7B-Instruct"))

The LLM options and their checks are `opsd_critic.llm_config.LLMConfig`'s, inherited (one source); this module
does not import openai (`opsd_critic.llm` does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from opsd_critic.llm_config import LLMConfig

CRITIC_NAMES = ("schema", "reference", "llm", "schema+reference", "schema+llm")  # == opsd_critic.CRITICS (tested)
LLM_CRITICS = ("llm", "schema+llm")
RETRY_FAILED = ("transport", "none", "all")  # == opsd_critic.runner.RETRY_FAILED (tested)


@dataclass(repr=False)
class _CriticName:
    name: Literal["schema", "reference", "llm", "schema+reference", "schema+llm"] = field(
        default="schema+reference", metadata={"help": "schema: calls against the tool schemas; reference: the first "
                                              "reply against meta.ground_truth (BFCL); llm: any OpenAI-compatible "
                                              "model; schema+reference: schema, then reference where there is ground "
                                              "truth; schema+llm: the LLM, with schema overruling an LLM 'ok'"})


@dataclass(repr=False)
class CriticConfig(LLMConfig, _CriticName):
    """Which critic, every LLM option (inherited from `opsd_critic.llm_config.LLMConfig`, with its checks: written once)
    and the run's settings. Fields in flag order: `name`, the LLM options, then these (a dataclass takes its bases'
    fields in reverse MRO order)."""

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
        self.check(self.name if self.uses_llm else None)  # the LLM options' checks (opsd_critic.llm_config)
        for name, low in (("concurrency", 1), ("max_errors", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: must be >= {low}, got {getattr(self, name)}")
        if self.retry_failed not in RETRY_FAILED:
            raise ValueError(f"retry_failed: must be one of {', '.join(RETRY_FAILED)}, got {self.retry_failed!r}")
        if not 0 <= self.max_transport_failure_share <= 1:
            raise ValueError(f"max_transport_failure_share: must be in [0, 1], got {self.max_transport_failure_share}")

    @property
    def uses_llm(self) -> bool:
        return self.name in LLM_CRITICS


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
