"""`RolloutConfig`: the settings of `opsd rollout` (flags and YAML are generated from its fields).

    from opsd.rollout.config import RolloutConfig
    RolloutConfig(tasks="bfcl:simple_python:train", out="runs/r/rollouts.jsonl", limit=64)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from opsd.io.models import PRECISIONS, fingerprint, generation_settings, resolve_precision
from opsd.redact import redact, redact_urls, redacted_repr, url_secrets
from opsd.types import content_hash

STOP_TEXT = "</tool_call>"


@dataclass
class RolloutConfig:
    tasks: str = field(default="bfcl:simple_python:train", metadata={"help": "task spec (bfcl:CAT[:split]) or a task JSONL file"})
    out: str = field(default="rollouts.jsonl", metadata={"help": "output trajectories (JSONL, appended, resumable)"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "HF model name/path (hf backend) or label (openai)"})
    backend: str = field(default="hf", metadata={"help": "hf | openai (chat) | completions (token-exact: opsd's prompt ids to /v1/completions)"})
    samples: int = field(default=1, metadata={"help": "samples per task"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (temperature > 0)"})
    max_new_tokens: int = field(default=128, metadata={"help": "generation budget per reply"})
    limit: int | None = field(default=None, metadata={"help": "first N tasks in deterministic order"})
    batch_size: int = field(default=0, metadata={"help": "hf: rows decoded together; 0 = as many as a quarter of free memory holds (CPU: at most 64)"})
    precision: str = field(default="auto", metadata={"help": "hf: weights dtype, auto | fp32 | bf16 (auto = bf16 where the CPU has AVX512-BF16/AMX, or on a GPU)"})
    prefill: str | None = field(default=None, metadata={"escapes": True, "help": "reply prefill; None = \"<tool_call>\\n\" for the embedded model, else \"\""})
    stop_at_call: bool = field(default=True, metadata={"help": "stop after the first </tool_call> unless the task expects parallel calls"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str | None = field(default=None, metadata={"help": "cuda | cpu (default: cuda when available)"})
    base_url: str | None = field(default=None, metadata={"help": "openai backend: server URL"})
    api_model: str | None = field(default=None, metadata={"help": "openai backend: model name on the server (default: --model)"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "env var holding the API key (never logged)"})
    concurrency: int = field(default=16, metadata={"help": "openai backend: requests in flight"})
    timeout: float = field(default=120.0, metadata={"help": "openai backend: per-request timeout (s)"})
    extra_meta: dict = field(default_factory=dict, metadata={"help": "copied into every trajectory's meta"})
    datasets_out: str = field(default="", metadata={
        "help": "also write this run's trajectories as a `datasets` save_to_disk folder here when the stage ends "
                "(--out stays the resumable JSONL); '' = none"})
    # multi-turn tasks (bfcl:multi_turn_*; opsd.rollout.multi_turn)
    max_steps_per_turn: int = field(default=8, metadata={"help": "multi-turn: replies per user turn; still calling at the cap ends the episode"})
    episode_seconds: float = field(default=600.0, metadata={"help": "multi-turn: wall-time cap per episode (s)"})
    prefill_steps: str = field(default="turn_start", metadata={"help": "multi-turn: which replies get the prefill: turn_start | every_step | never"})

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "openai", "completions"):
            raise ValueError(f"backend must be hf, openai or completions, got {self.backend!r}")
        if self.samples < 1 or self.max_new_tokens < 1 or self.concurrency < 1:
            raise ValueError("samples, max_new_tokens and concurrency must be >= 1")
        if self.batch_size < 0:
            raise ValueError(f"batch_size: must be >= 0 (0 = from free memory), got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.datasets_out and Path(self.datasets_out).is_file():
            raise ValueError(f"datasets_out: {self.datasets_out} is a file; a datasets output is a folder")
        if self.max_steps_per_turn < 1 or self.episode_seconds <= 0:
            raise ValueError("max_steps_per_turn: must be >= 1; episode_seconds: must be > 0")
        if self.prefill_steps not in ("turn_start", "every_step", "never"):
            raise ValueError(f"prefill_steps: must be turn_start, every_step or never, got {self.prefill_steps!r}")
        if self.backend in ("openai", "completions") and not self.base_url:
            raise ValueError(f"the {self.backend} backend needs --base-url")

    def __repr__(self) -> str:  # a key in base_url never shows
        return redacted_repr(self)

    def secrets(self) -> list[str]:
        """What no output may hold: the API key in the environment and the credentials in base_url."""
        return [os.environ.get(self.api_key_env) or "", *url_secrets(self.base_url or "")]

    def redact(self, text: str) -> str:
        """`text` fit to be written or printed: URL credentials and `secrets()` masked."""
        return redact(redact_urls(text), self.secrets())

    def resolved_prefill(self) -> str:
        if self.prefill is not None:
            return self.prefill
        return generation_settings(self.model).get("prefill", "")

    def resolved_precision(self) -> str:
        """"fp32" or "bf16": what `auto` means on this machine (hf backend)."""
        return resolve_precision(self.precision, self.device)

    def hash(self) -> str:
        keys = ("backend", "temperature", "top_p", "max_new_tokens", "stop_at_call", "seed", "api_model")
        mt = {k: getattr(self, k) for k, d in (("max_steps_per_turn", 8), ("prefill_steps", "turn_start"))
              if getattr(self, k) != d}  # only when set: single-turn keys stay as they were
        if self.backend == "hf" and self.resolved_precision() != "fp32":
            mt["precision"] = self.resolved_precision()  # bf16 replies differ; fp32 keys stay as they were
        return content_hash({k: getattr(self, k) for k in keys} | mt | {"prefill": self.resolved_prefill(),
                            "model": fingerprint(self.model) if self.backend == "hf" else str(self.model)})[:10]


def prefill_arg(text: str | None) -> str | None:
    """A `--prefill` value from the shell: backslash escapes (`\\n`, `\\t`) become characters,
    non-ASCII text stays intact, "" means no prefill and None means the model's default."""
    if text is None:
        return None
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
