"""`EvalConfig`: the settings of `opsd eval` (flags and YAML are generated from its fields).

With `--logs`, `opsd eval` scores critiqued logs instead of rolling out tasks (`opsd.eval.logs`); the
rollout fields (tasks, limit, max_new_tokens, batch_size, prefill) then do not apply."""
from __future__ import annotations

from dataclasses import dataclass, field

from opsd.critique.config import CriticConfig
from opsd.logs import as_paths
from opsd.types import PLACEMENTS, SPANS

PRECISIONS = ("auto", "fp32", "bf16")  # opsd.io.models.PRECISIONS (not imported: it pulls in torch)


@dataclass
class EvalConfig:
    before: str = field(default="smollm2-135m-instruct", metadata={"help": "model A (the student before training)"})
    after: str = field(default="runs/demo/model", metadata={"help": "model B (after training)"})
    tasks: str = field(default="bfcl:multiple,parallel_multiple:heldout",
                       metadata={"help": "held-out task spec (bfcl:CAT[,CAT...]:heldout; tasks with several tools give "
                                         "the model a real choice) or a task file"})
    logs: list[str] = field(default_factory=list, metadata={
        "help": "held-out trajectory logs (any format `opsd validate` reads): evaluate the before/after models on "
                "their critiqued errors, teacher-forced, instead of rolling out --tasks"})
    critiques: list[str] = field(default_factory=list, metadata={
        "help": "with --logs: their critiques (`opsd critique`); none: --logs are critiqued with --critic into "
                "OUT/critiques.jsonl"})
    rejects: str | None = field(default=None, metadata={
        "help": "with --logs: write invalid records here, with the reason, and go on (None: stop at the first)"})
    out: str = field(default="runs/demo/report", metadata={"help": "report folder"})
    limit: int | None = field(default=128, metadata={"help": "N tasks: a stratified sample per category on a BFCL spec, "
                                                              "the first N of a task file; None = all"})
    max_new_tokens: int = field(default=128, metadata={"help": "rollout budget per reply"})
    batch_size: int = field(default=0, metadata={
        "help": "rollout batch; 0 = from free memory (CPU: at most 64; 128 held-out replies took 113-116 s at 32-64 "
                "rows vs 135 s at 16, BENCHMARKS.md)"})
    score_batch_size: int = field(default=8, metadata={"help": "teacher-forced scoring batch"})
    prefill: str | None = field(default=None, metadata={"escapes": True, "help": "reply prefill (None: decided from --before, used for both models)"})
    placement: str = field(default="user", metadata={"help": "hint placement for the hinted-teacher reference"})
    span: str = field(default="quote", metadata={"help": "target span kind for teacher-forced metrics"})
    train_run: str | None = field(default=None, metadata={"help": "training run folder: adds training curves from its metrics.jsonl"})
    device: str | None = field(default=None, metadata={"help": "cuda | cpu"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where the CPU/GPU has bf16 units) | fp32 | bf16; "
                                                              "for loading both models and their rollouts"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples (over tasks) for every paired 95% CI"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed (the report recomputes to the same numbers)"})
    critic: CriticConfig = field(default_factory=CriticConfig, metadata={
        "help": "the critic of both models' replies (schema+reference: every error is also listed per reply)"})

    def __post_init__(self) -> None:
        self.logs, self.critiques = as_paths(self.logs), as_paths(self.critiques)
        if (self.critiques or self.rejects) and not self.logs:
            raise ValueError("critiques, rejects: only used with --logs (critiqued logs instead of --tasks)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be >= 1 (or None for every task), got {self.limit}")
        if self.max_new_tokens < 1 or self.batch_size < 0 or self.score_batch_size < 1:
            raise ValueError("max_new_tokens, score_batch_size: each must be >= 1; batch_size >= 0 (0 = from free memory)")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.span not in SPANS:
            raise ValueError(f"span: must be one of {', '.join(SPANS)}, got {self.span!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.bootstrap < 100:
            raise ValueError(f"bootstrap: use at least 100 resamples for a 95% interval, got {self.bootstrap}")
