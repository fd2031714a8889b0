"""The one flat `TrainConfig` of `opsd train`, and its 1:1 mapping to CLI flags and YAML.

Every field is a flag (`lora_r` -> `--lora-r`, booleans also take `--no-...`) and a YAML key.
Precedence: field default < `--config cfg.yaml` < flags given on the command line. The help
text of each flag is the field's trailing comment below, so it is written once.

    opsd train --model smollm2-135m-instruct --trajectories data/sample_openai.jsonl \\
        --critiques data/sample_critiques.jsonl --out runs/demo --max-steps 8 --lr 5e-5
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from opsd.types import DIVERGENCES as KINDS
from opsd.types import PLACEMENTS, SPANS, TEACHERS

MODES = ("auto", "opsd", "gkd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    # data and model
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "student: embedded default, local HF dir or cached hub id"})
    trajectories: str = field(default="", metadata={"help": "trajectory JSONL (any format `opsd validate` accepts)"})
    critiques: str = field(default="", metadata={"help": "critique JSONL (Critique.to_dict() + \"key\" per line); not used by mode=gkd"})
    mode: str = field(default="auto", metadata={"help": "opsd (hinted error spans from --critiques) | gkd (every token of each last assistant reply) | auto: gkd when no --critiques"})
    out: str = field(default="", metadata={"help": "run folder: model/, config.yaml, metrics.jsonl, checkpoints/, examples.jsonl"})
    # hinted examples
    placement: str = field(default="user", metadata={"help": "where the hint goes: user | system | inline"})
    span: str = field(default="quote", metadata={"help": "target tokens: quote | step_from_error | step"})
    inline_open: str = field(default="<hint>", metadata={"help": "opening tag for placement=inline"})
    inline_close: str = field(default="</hint>", metadata={"help": "closing tag for placement=inline"})
    min_hint_effect: float = field(default=0.0, metadata={"help": "keep examples whose hint lowers the error tokens by more than this (nats); =-inf keeps all"})
    # teacher
    teacher: str = field(default="self", metadata={"help": "self (current weights) | initial (frozen start) | ema | external"})
    teacher_model: str = field(default="", metadata={"help": "model for teacher=external (must share the student's tokenizer)"})
    ema_decay: float = field(default=0.99, metadata={"help": "teacher=ema: ema = decay * ema + (1 - decay) * weights, after every step"})
    precompute_targets: bool = field(default=False, metadata={"help": "store teacher top-k per span token before training (teacher initial|external)"})
    top_k: int = field(default=256, metadata={"help": "k of precomputed top-k targets (the rest of the mass is one tail bucket)"})
    # loss
    loss: str = field(default="jsd", metadata={"help": "divergence: jsd | forward_kl | reverse_kl"})
    beta: float = field(default=0.5, metadata={"help": "jsd mixture weight: 0 = forward KL, 1 = reverse KL exactly"})
    temperature: float = field(default=1.0, metadata={"help": "both logits are divided by it"})
    # GKD (mode=gkd): data source per step, sampling, context distillation, GKD+RL
    lmbda: float = field(default=0.0, metadata={"help": "GKD: probability that a step trains on fresh student samples instead of the dataset replies"})
    seq_kd: bool = field(default=False, metadata={"help": "GKD: the non-student steps train on teacher-generated replies instead of the dataset replies"})
    teacher_system: str = field(default="", metadata={"help": "GKD: instruction appended to the system message only the teacher sees (context distillation)"})
    max_new_tokens: int = field(default=128, metadata={"help": "token budget of replies sampled in the loop (student, teacher, cold start)"})
    gen_temperature: float = field(default=1.0, metadata={"help": "sampling temperature of replies sampled in the loop (0 = greedy)"})
    gen_prefill: str = field(default="", metadata={"help": "GKD: reply prefill before sampled replies, not trained on (e.g. \"<tool_call>\\n\" for SmolLM2)"})
    rl_alpha: float = field(default=1.0, metadata={"help": "GKD+RL: maximise (1-a)*reward - a*divergence on student samples; 1 = no reward term"})
    reward: str = field(default="schema", metadata={"help": "GKD+RL reward critic (built by the CLI): schema (1 for a valid call) | reference | schema+reference"})
    samples_per_prompt: int = field(default=2, metadata={"help": "GKD+RL: student samples per prompt (>= 2: the baseline is the per-prompt mean reward)"})
    # fixes for failing on-policy distillation ("Rethinking OPD")
    cold_start_sft: int = field(default=0, metadata={"help": "supervised steps first, on reference replies (GKD) or teacher samples (OPSD, GKD --seq-kd)"})
    select_prompts: bool = field(default=False, metadata={"help": "pre-pass keeping prompts whose top-k overlap (GKD) or hint effect (OPSD) passes"})
    select_overlap: float = field(default=0.5, metadata={"help": "--select-prompts, GKD: keep prompts whose mean teacher-student top-k overlap is >= this"})
    select_mix: float = field(default=0.1, metadata={"help": "--select-prompts: fraction of the rejected prompts mixed back in (dropping all collapses entropy)"})
    diag_top_k: int = field(default=16, metadata={"help": "k of the top-k overlap diagnostics (diag/top16_overlap, diag/overlap_mass)"})
    # optimisation
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    schedule: str = field(default="cosine", metadata={"help": "decay after warmup: cosine | linear | constant"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    batch_size: int = field(default=4, metadata={"help": "examples per device per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the examples (used when max_steps is 0)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = ceil(epochs * examples / global batch)"})
    seed: int = field(default=0, metadata={"help": "seeds model init of LoRA, data order and torch RNGs"})
    # model options
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_targets: str = field(default="all-linear", metadata={"help": "LoRA target modules: all-linear or comma-separated names"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward to save memory"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, none on CPU) | no | bf16 | fp16"})
    cpu: bool = field(default=False, metadata={"help": "force CPU even when a GPU is present"})
    # run bookkeeping
    save_every: int = field(default=0, metadata={"help": "checkpoint every N optimizer steps (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept on disk"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in OUT/checkpoints (fresh start if none)"})
    log_every: int = field(default=1, metadata={"help": "write metrics every N optimizer steps"})
    report_to: str = field(default="", metadata={"help": "accelerate trackers, e.g. tensorboard or wandb (comma-separated); metrics.jsonl always"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"config: {msg}")

        need(self.placement in PLACEMENTS, f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        need(self.span in SPANS, f"span must be one of {SPANS}, got {self.span!r}")
        need(not (self.placement == "inline" and self.span == "step"), "placement=inline cannot use span=step")
        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(not (self.mode == "opsd" and not self.critiques and self.trajectories), "mode=opsd needs --critiques")
        need(0.0 <= self.lmbda <= 1.0, f"lmbda must be in [0, 1], got {self.lmbda}")
        need(0.0 <= self.rl_alpha <= 1.0, f"rl_alpha must be in [0, 1], got {self.rl_alpha}")
        need(self.rl_alpha == 1.0 or (self.is_gkd and self.lmbda > 0),
             "rl_alpha < 1 (GKD+RL) needs mode=gkd and lmbda > 0: the reward is taken on student samples")
        need(self.reward in ("schema", "reference", "schema+reference"),
             f"reward must be schema, reference or schema+reference (a rule critic), got {self.reward!r}")
        need(self.samples_per_prompt >= 1 and (self.rl_alpha == 1.0 or self.samples_per_prompt >= 2),
             "samples_per_prompt must be >= 1, and >= 2 with rl_alpha < 1 (per-prompt mean baseline)")
        need(self.max_new_tokens >= 1 and self.gen_temperature >= 0, "max_new_tokens >= 1 and gen_temperature >= 0")
        need(self.cold_start_sft >= 0 and 0.0 <= self.select_mix <= 1.0, "cold_start_sft >= 0, select_mix in [0, 1]")
        need(self.diag_top_k >= 1, f"diag_top_k must be >= 1, got {self.diag_top_k}")
        need(self.teacher in TEACHERS, f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        need((self.teacher == "external") == bool(self.teacher_model),
             "--teacher-model is required with teacher=external and only used with it")
        need(not self.precompute_targets or self.teacher in ("initial", "external"),
             "precompute_targets needs a fixed teacher (initial or external); self/ema change during training")
        need(not (self.teacher == "initial" and self.lora_r == 0 and not self.precompute_targets),
             "teacher=initial without LoRA needs --precompute-targets (with LoRA the adapters are disabled instead)")
        need(not (self.is_gkd and self.precompute_targets),
             "precompute_targets is OPSD-only: GKD scores replies sampled during training")
        need(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        need(self.loss in KINDS, f"loss must be one of {KINDS}, got {self.loss!r}")
        need(0.0 <= self.beta <= 1.0, f"beta must be in [0, 1], got {self.beta}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive finite number, got {self.lr}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        need(self.max_steps >= 0 and self.epochs > 0, "max_steps must be >= 0 and epochs > 0")
        need(self.warmup_steps >= 0 and self.max_grad_norm >= 0, "warmup_steps and max_grad_norm must be >= 0")
        need(self.lora_r >= 0, f"lora_r must be >= 0, got {self.lora_r}")
        need(self.mixed_precision in ("auto", "no", "bf16", "fp16"), f"bad mixed_precision {self.mixed_precision!r}")
        need(self.save_every >= 0 and self.keep_checkpoints >= 1 and self.log_every >= 1,
             "save_every >= 0, keep_checkpoints >= 1, log_every >= 1")

    @property
    def is_gkd(self) -> bool:
        """GKD mode: explicit, or `auto` without critiques."""
        return self.mode == "gkd" or (self.mode == "auto" and not self.critiques)

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def _field_help() -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(TrainConfig)}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags stay absent so YAML values are not overridden."""
    parser.add_argument("--config", metavar="CFG.yaml", help="YAML file with TrainConfig fields (flags override it)")
    helps = _field_help()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{helps.get(f.name, '')} (default: {f.default!r})"}
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=typ, metavar=f.name.split("_")[-1].upper(), **kw)


def load_yaml(path: str | Path) -> dict:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig fields")
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; valid keys are the TrainConfig fields ({', '.join(sorted(names))})")
    return data


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig = defaults, then the YAML file, then the flags that were given."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    for k in ("min_hint_effect", "lr", "beta", "temperature", "ema_decay", "epochs", "lmbda", "rl_alpha", "gen_temperature",
              "select_overlap", "select_mix"):
        if isinstance(values.get(k), str):  # YAML reads "-inf" / "1e-5" as strings
            values[k] = float(values[k])
    if isinstance(values.get("gen_prefill"), str):  # a flag spells a newline as backslash-n
        values["gen_prefill"] = values["gen_prefill"].replace("\\n", "\n")
    return TrainConfig(**values)
