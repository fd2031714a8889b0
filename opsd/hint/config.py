"""`HintConfig`: the settings of `opsd hint` (flags and YAML are generated from its fields)."""
from __future__ import annotations

from dataclasses import dataclass, field

from opsd.types import PLACEMENTS, SPANS


@dataclass
class HintConfig:
    trajectories: str = field(default="", metadata={"help": "trajectory logs (any format `opsd validate` reads)"})
    critiques: str = field(default="", metadata={"help": "critique JSONL written by `opsd critique`"})
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

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.span not in SPANS:
            raise ValueError(f"span: must be one of {', '.join(SPANS)}, got {self.span!r}")
        if self.placement == "inline" and self.span == "step":
            raise ValueError("span: placement=inline puts the hint inside the step, so span=step cannot be aligned; "
                             "use span=quote or span=step_from_error")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision: must be auto, fp32 or bf16, got {self.precision!r}")
