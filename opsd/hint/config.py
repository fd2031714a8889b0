"""`HintConfig`: the settings of `opsd hint` (flags and YAML are generated from its fields)."""
from __future__ import annotations

from dataclasses import dataclass, field

from opsd.critique.config import CriticConfig
from opsd.logs import as_paths
from opsd.types import PLACEMENTS, SPANS


@dataclass
class HintConfig:
    trajectories: list[str] = field(default_factory=list, metadata={
        "help": "trajectory logs, one or more (any format `opsd validate` reads)"})
    critiques: list[str] = field(default_factory=list, metadata={
        "help": "critique files written by `opsd critique`, one or more"})
    rejects: str | None = field(default=None, metadata={
        "help": "write invalid trajectory records here, with the reason, and go on (None: stop at the first)"})
    out: str = field(default="", metadata={"help": "output folder: examples.jsonl, hint_effects.json, hint_effects.md"})
    model: str = field(default="smollm2-135m-instruct",
                       metadata={"help": "the model whose hint effect is measured (the student; it is its own teacher)"})
    placement: str = field(default="user", metadata={"help": "where the hint goes: user | system | inline"})
    span: str = field(default="quote", metadata={"help": "target tokens: quote | step_from_error | step"})
    inline_open: str = field(default="<hint>", metadata={"help": "opening tag for placement=inline"})
    inline_close: str = field(default="</hint>", metadata={"help": "closing tag for placement=inline"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where the CPU/GPU has bf16 units) | fp32 | bf16"})
    device: str | None = field(default=None, metadata={"help": "cuda | cpu (default: cuda when available)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on stderr while measuring"})
    ceiling: bool = field(default=False, metadata={
        "help": "also decode greedily with each hint in view and score the replies with --critic (and BFCL's official "
                "checker where the logs carry BFCL ground truth): the hinted teacher's ceiling, OUT/ceiling/"})
    critic: CriticConfig = field(default_factory=CriticConfig, metadata={
        "help": "--ceiling: the critic that scores the hinted replies (schema+reference: rule critics, no server)"})
    max_new_tokens: int = field(default=128, metadata={"help": "--ceiling: token budget of each hinted reply"})
    prefill: str | None = field(default=None, metadata={
        "escapes": True, "help": "--ceiling: reply prefill; None = the model's own (<tool_call>\\n for the embedded model)"})

    def __post_init__(self) -> None:
        self.trajectories, self.critiques = as_paths(self.trajectories), as_paths(self.critiques)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.span not in SPANS:
            raise ValueError(f"span: must be one of {', '.join(SPANS)}, got {self.span!r}")
        if self.placement == "inline" and self.span == "step":
            raise ValueError("span: placement=inline puts the hint inside the step, so span=step cannot be aligned; "
                             "use span=quote or span=step_from_error")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision: must be auto, fp32 or bf16, got {self.precision!r}")
