"""`EvalConfig`: the settings of `opsd eval` (flags and YAML are generated from its fields)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    before: str = field(default="smollm2-135m-instruct", metadata={"help": "model A (the student before training)"})
    after: str = field(default="runs/demo/model", metadata={"help": "model B (after training)"})
    tasks: str = field(default="bfcl:simple_python,multiple:heldout", metadata={"help": "held-out task spec or task file"})
    out: str = field(default="runs/demo/report", metadata={"help": "report folder"})
    limit: int | None = field(default=64, metadata={"help": "first N tasks"})
    max_new_tokens: int = field(default=128, metadata={"help": "rollout budget per reply"})
    batch_size: int = field(default=16, metadata={"help": "rollout batch"})
    score_batch_size: int = field(default=8, metadata={"help": "teacher-forced scoring batch"})
    prefill: str | None = field(default=None, metadata={"help": "reply prefill (None: decided from --before, used for both models)"})
    placement: str = field(default="user", metadata={"help": "hint placement for the hinted-teacher reference"})
    span: str = field(default="quote", metadata={"help": "target span kind for teacher-forced metrics"})
    train_run: str | None = field(default=None, metadata={"help": "training run folder: adds training curves from its metrics.jsonl"})
    device: str | None = field(default=None, metadata={"help": "cuda | cpu"})

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
