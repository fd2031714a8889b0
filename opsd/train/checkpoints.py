"""A run folder's files: checkpoints (atomic, resumable), the final model and metrics.jsonl (`opsd.train`).

    from opsd.train.checkpoints import latest_checkpoint, save_checkpoint, save_model, Metrics

A checkpoint is written to `step-NNNNNN.tmp` and is complete once it has its final name
`step-NNNNNN` (with its trainer_state.json). A run killed while writing one leaves the `.tmp`
folder: `latest_checkpoint` skips it, with a warning, and resumes from the newest complete one;
when there is none, the resumed run starts again from step 0 and says so. `Metrics(...,
resume_step=K)` drops the rows a killed run logged after step K, so metrics.jsonl never holds a
step twice.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from opsd.io import models

log = logging.getLogger(__name__)
_COMPLETE_RE = re.compile(r"^step-\d{6}$")


def is_complete(ckpt: Path) -> bool:
    """A checkpoint folder under its final name, with its trainer_state.json (written last)."""
    return bool(_COMPLETE_RE.match(ckpt.name)) and (ckpt / "trainer_state.json").is_file()


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of run folder `out` (None: none). Incomplete ones (a kill while writing)
    newer than it are named in a warning; a run resumed with none starts again from step 0, loudly."""
    found = sorted((out / "checkpoints").glob("step-*"))
    done = [p for p in found if is_complete(p)]
    newest = done[-1] if done else None
    partial = [p.name for p in found if not is_complete(p) and (newest is None or p.name > newest.name)]
    if partial:
        log.warning("%s: incomplete checkpoint(s) %s (the run was killed while writing them) are skipped; %s",
                    out / "checkpoints", ", ".join(partial),
                    f"resuming from {newest.name}" if newest else "no complete checkpoint: starting again from step 0")
    elif newest is None and logged_steps(out / "metrics.jsonl"):
        log.warning("%s: no checkpoint to resume from (the earlier run wrote none): starting again from step 0",
                    out / "checkpoints")
    return newest


def save_checkpoint(accelerator, out: Path, step: int, keep: int) -> Path:
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing this step
    accelerator.wait_for_everyone()
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


def logged_steps(path: Path) -> list[int]:
    """The steps of metrics.jsonl's rows, in file order ([] when there is no file)."""
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text("utf-8").splitlines() if line.strip()]


def trim_metrics(path: Path, resume_step: int) -> int:
    """Keep the rows of metrics.jsonl up to `resume_step` (none when 0: the run starts over); a torn last line
    goes too. Returns how many rows were dropped. Rewritten atomically (a temp file, then a rename)."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text("utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill
            dropped += 1
            continue
        if resume_step > 0 and row.get("step", 0) <= resume_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), "utf-8")
        tmp.replace(path)
    return dropped


class Metrics:
    """metrics.jsonl (main process) plus accelerate trackers when configured."""

    def __init__(self, accelerator, path: Path, tracker_config: dict | None = None, *, resume_step: int = 0):
        """`tracker_config`: the run's settings, given to accelerate's trackers (when `log_with` was set).
        `resume_step`: the step the run starts from; rows an earlier run logged after it are dropped (all of
        them when 0), since this run logs those steps again."""
        self.acc, self.path = accelerator, path
        if accelerator.is_main_process:
            dropped = trim_metrics(path, resume_step)
            if dropped:
                log.info("%s: dropped %d row(s) logged after step %d by an earlier run", path, dropped, resume_step)
        if accelerator.log_with:
            accelerator.init_trackers("opsd", config=tracker_config or {})

    def log(self, step: int, values: dict) -> None:
        if self.acc.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        self.acc.log(values, step=step)
