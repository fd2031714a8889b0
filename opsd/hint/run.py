"""`opsd hint`: build the hinted examples of a critique file and measure how much each hint moves the model.

    opsd hint --trajectories runs/r/rollouts.jsonl --critiques runs/r/critiques.jsonl --out runs/r/hints
    opsd hint --trajectories a.jsonl b.jsonl.gz --critiques ca.jsonl cb.jsonl --rejects runs/r/rejects.jsonl --out runs/r/hints

For every `error` critique: the student sequence (the trajectory up to the erroneous step) and
the teacher sequence (the same with the hint right above the step), with aligned target spans
(`opsd.hint.build`). One forward pass of the model over each gives the **hint effect**: the mean
change of the log-prob of the quoted error tokens when the hint is present (negative = the hint
lowers the error, which is what OPSD distils). Outputs, in OUT:

- `examples.jsonl`: one line per built example: the `HintedExample` fields plus `hint_effect`,
  `hint_effect_first` (first error token), `student_logprob`, and the critique's category/hint;
- `hint_effects.json` / `hint_effects.md`: the per-category table (n, mean effect with a 95%
  interval, share of examples lowered, first-token effect) and the skip counts per reason.

The table is how a user tells a good critic prompt from a bad one: hints that barely move the
model give the student little to learn. With `--ceiling`, the model also DECODES greedily with each
hint in view, and `--critic` scores the replies (`opsd.hint.ceiling`): OUT/ceiling/ceiling.json and a
line in hint_effects.md say how often the hinted teacher would have written a correct reply, next to
the student's own replies on the same tasks; self-distillation cannot teach more than that.

    opsd hint --trajectories rollouts.jsonl --critiques critiques.jsonl --out hints --ceiling
"""
from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from opsd.critique.run import critique_fn
from opsd.hint.build import build_examples
from opsd.hint.ceiling import format_ceiling, run_ceiling
from opsd.hint.config import HintConfig
from opsd.hint.measure import measure
from opsd.io import models
from opsd.logs import read_critiques, read_logs
from opsd.rollout.config import RolloutConfig
from opsd.types import Critique, HintedExample

Z95 = 1.96


@dataclass
class CategoryEffect:
    """Hint effect of one error category (nats per error token; negative = the hint lowers the error)."""

    category: str
    n: int
    mean: float
    ci95: tuple[float, float]  # normal approximation over examples
    lowered: int  # examples whose hint lowered the error tokens
    first_token_mean: float


@dataclass
class HintReport:
    examples: int = 0
    critiques: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count (ok/failed verdicts, unbuildable quotes, ...)
    categories: list[CategoryEffect] = field(default_factory=list)  # sorted by n, then name; "all" last


def _mean_ci(xs: list[float]) -> tuple[float, tuple[float, float]]:
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, (mean, mean)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)


def category_effects(rows: list[dict]) -> list[CategoryEffect]:
    """Per-category table of `examples.jsonl` rows (`category`, `hint_effect`, `hint_effect_first`), plus "all"."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("category") or "unknown", []).append(r)
    out = []
    for name, rs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])) + ([("all", rows)] if rows else []):
        mean, ci = _mean_ci([r["hint_effect"] for r in rs])
        first, _ = _mean_ci([r["hint_effect_first"] for r in rs])
        out.append(CategoryEffect(name, len(rs), mean, ci, sum(r["hint_effect"] < 0 for r in rs), first))
    return out


def format_table(report: HintReport) -> str:
    """Markdown table of the per-category hint effects, then the skip counts."""
    lines = ["| category | n | mean hint effect (nats/token) [95% CI] | lowered | first error token |",
             "|---|---|---|---|---|"]
    for c in report.categories:
        lines.append(f"| {c.category} | {c.n} | {c.mean:+.3f} [{c.ci95[0]:+.3f}, {c.ci95[1]:+.3f}] | "
                     f"{c.lowered}/{c.n} | {c.first_token_mean:+.3f} |")
    if not report.categories:
        lines.append("| (no examples) | 0 | n/a | n/a | n/a |")
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items())) or "none"
    lines.append(f"\n{report.examples} examples from {report.critiques} critiques; not built: {skipped}")
    return "\n".join(lines)


def measure_examples(lm, tok, examples: list[HintedExample], critiques: dict[str, Critique], *,
                     batch_size: int, progress: bool = False) -> list[dict]:
    """examples.jsonl rows: each example with its hint effect (the model is its own hinted teacher), measured
    in chunks of a few batches behind a progress bar (stderr) when `progress`."""
    scores, chunk_size = [], 4 * batch_size
    with tqdm(total=len(examples), desc="hint effect", unit="example", disable=not progress, file=sys.stderr) as bar:
        for i in range(0, len(examples), chunk_size):
            chunk = examples[i:i + chunk_size]
            scores += measure(lm, lm, chunk, batch_size=batch_size, pad_id=tok.pad_token_id or 0)
            bar.update(len(chunk))
    rows = []
    for ex, score in zip(examples, scores):
        c = critiques.get(ex.meta["trajectory_id"])
        rows.append({**ex.to_dict(), **score.scores(), "category": ex.meta.get("category") or "unknown",
                     "hint": c.hint if c else None, "quote": c.quote if c else None})
    return rows


def main(cfg: HintConfig) -> HintReport:
    """Build, measure and write the hinted examples of `cfg.critiques` (see module docstring)."""
    if not (cfg.trajectories and cfg.critiques and cfg.out):
        raise ValueError("opsd hint needs trajectories, critiques and out")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    trajs, _ = read_logs(cfg.trajectories, rejects=cfg.rejects)
    critiques = read_critiques(cfg.critiques)  # a retried failure supersedes it
    dtype = torch.bfloat16 if models.resolve_precision(cfg.precision, cfg.device) == "bf16" else torch.float32
    lm, tok = models.load(cfg.model, device=cfg.device, dtype=dtype)
    examples, counts = build_examples(trajs, critiques, tok, placement=cfg.placement, span=cfg.span,
                                      inline_tags=(cfg.inline_open, cfg.inline_close))
    by_traj = {c.trajectory_id: c for c in critiques if c.verdict == "error"}
    rows = measure_examples(lm, tok, examples, by_traj, batch_size=cfg.batch_size, progress=cfg.progress)
    with (out / "examples.jsonl").open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    skipped = Counter({k: v for k, v in counts.items() if k != "used"})
    report = HintReport(examples=len(rows), critiques=len(critiques), skipped=dict(skipped),
                        categories=category_effects(rows))
    (out / "hint_effects.json").write_text(json.dumps({
        "examples": report.examples, "critiques": report.critiques, "skipped": report.skipped,
        "categories": [c.__dict__ | {"ci95": list(c.ci95)} for c in report.categories],
        "model": cfg.model, "placement": cfg.placement, "span": cfg.span}, indent=2))
    table = format_table(report)
    if cfg.ceiling:
        rcfg = RolloutConfig(model=cfg.model, prefill=cfg.prefill, max_new_tokens=cfg.max_new_tokens,
                             precision=cfg.precision, batch_size=cfg.batch_size, out=str(out / "ceiling" / "rollouts.jsonl"))
        ceiling = run_ceiling(trajs, critiques, rollout=rcfg, critique=critique_fn(cfg.critic), out=out / "ceiling")
        table += "\n\n" + format_ceiling(ceiling)
    (out / "hint_effects.md").write_text(table + "\n")
    return report
