"""A run folder's files: checkpoints (atomic, resumable), the final model and metrics.jsonl (`opsd.train`).

    from opsd.train.checkpoints import latest_checkpoint, save_checkpoint, save_model, Metrics
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from opsd.io import models


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def save_checkpoint(accelerator, out: Path, step: int, keep: int) -> Path:
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a checkpoint is complete once it has its final name
        for old in sorted((out / "checkpoints").glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_model(lm, tok, out: Path, *, source_model: str) -> Path:
    """OUT/model: the LoRA adapter (base recorded portably) or the full weights, plus the tokenizer and the
    generation settings the student needs (its reply prefill, from `source_model`), so every later stage
    generates as before."""
    dest = out / "model"
    lm.save_pretrained(dest)
    tok.save_pretrained(dest)
    settings = models.generation_settings(source_model)
    if settings:
        models.save_generation_settings(dest, settings)
    ac = dest / "adapter_config.json"
    if ac.exists():  # a LoRA adapter: record its base so that it loads from anywhere
        meta = json.loads(ac.read_text())
        base = models.resolve(source_model)
        meta["base_model_name_or_path"] = models.DEFAULT_MODEL if str(source_model).lower() in models.ALIASES else (
            str(Path(base).resolve()) if isinstance(base, Path) else str(base))
        ac.write_text(json.dumps(meta, indent=2))
    return dest


class Metrics:
    """metrics.jsonl (main process) plus accelerate trackers when configured."""

    def __init__(self, accelerator, path: Path, tracker_config: dict | None = None):
        """`tracker_config`: the run's settings, given to accelerate's trackers (when `log_with` was set)."""
        self.acc, self.path = accelerator, path
        if accelerator.log_with:
            accelerator.init_trackers("opsd", config=tracker_config or {})

    def log(self, step: int, values: dict) -> None:
        if self.acc.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        self.acc.log(values, step=step)
