"""`opsd loop`: on-policy rounds of rollout -> critique -> train, each round from the previous round's student.

    opsd loop --out runs/loop --rounds 3 --rollout.tasks bfcl:multiple,parallel_multiple:train \\
        --rollout.limit 96 --train.lr 5e-5 --critic.name schema+reference

Round k = 1..R (artifacts in OUT/round_k/; the base student's validation in OUT/base_validation/):
1. draw this round's training tasks: the next `rollout.limit` tasks of a seeded shuffle of
   `rollout.tasks` (fresh tasks every round; `--no-fresh-tasks` reuses the same ones);
2. roll out the current student on them (its prefill travels with it), critique the replies;
3. train on the critiqued errors with a teacher frozen at the start of the round (the
   `TrainConfig` default: `initial`, precomputed targets or LoRA disabled);
4. score the new student on the validation split (rollouts + critiques: official-checker accuracy
   and total error rate). The base student is scored the same way first.
The loop stops early when the validation outcome gets worse than the best round so far
(`Validation.better_than`: accuracy, then replies whose parseable call names the right function,
then parseable replies, then fewer replies with an error), and reports the best round. Multi-turn tasks (`--tasks bfcl:multi_turn_base`, or a multi-turn `--rollout.tasks`) are
episodes in BFCL's simulated environments: validation then defaults to the same categories'
validation split, and accuracy is BFCL's official multi-turn checker's verdict per episode. The
held-out split is never used here: score it once, at the end (`opsd eval`, or `opsd demo`, which
runs this loop and then the held-out evaluation).

With `--serve`, rollouts go through a vLLM server started from `.venv-vllm` (`make vllm`):
token-exact completions, and after each round's training the new student is loaded into the
running server (a LoRA adapter hot-loaded and the previous one unloaded, or a restart on full
weights) before any rollout of the next round; a failed load stops the loop (ServerError).

Outputs: OUT/loop.json (config, per-round summary: error mix, hint effect, validation outcome)
and OUT/loop.md. Rerunning the same command resumes: every stage reuses what is on disk.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from opsd.critique.config import CriticConfig
from opsd.critique.run import critique_fn
from opsd.hint.ceiling import TEACHER_CHECKS, format_ceiling, run_ceiling, teacher_verified
from opsd.hint.run import category_effects
from opsd.io.models import fingerprint
from opsd.io.records import read_jsonl, write_records
from opsd.io.tasks import Task, load_tasks
from opsd.io.tasks import bfcl_multi_turn as mt
from opsd.io.tasks.overlap import check_off_heldout
from opsd.logs import as_paths
from opsd.pipelines.cold_start import cold_start
from opsd.pipelines.validation import Validation, summarise_validation
from opsd.redact import redacted
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import load_rollouts
from opsd.rollout.run import main as rollout_main
from opsd.serve import ServeConfig, VLLMServer, publish_adapter, publish_full_weights
from opsd.train.config import TrainConfig
from opsd.train.run import main as train_main
from opsd.types import content_hash

TRAIN_SPEC = "bfcl:multiple,parallel_multiple:train"  # several tools per task: a real choice of function
VALIDATION_SPEC = "bfcl:multiple,parallel_multiple:validation"
ADDED_OFF = {"anchor": 0.0}  # TrainConfig fields added after runs were cached, with the value that changes nothing
PIPELINE_FIELDS = {"rollout": ("out", "model"), "train": ("model", "trajectories", "critiques", "out"),
                   "server": ("model", "log")}


def multi_turn_split(spec: str, split: str) -> str | None:
    """`bfcl:CATS:split` for a BFCL spec whose categories are all multi-turn (None for any other spec): a
    multi-turn run is validated and evaluated on the other splits of the same categories."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != "bfcl" or not all(mt.is_category(c) for c in parts[1].split(",")):
        return None
    return f"bfcl:{parts[1]}:{split}"


def _loop_rollout() -> RolloutConfig:
    return RolloutConfig(tasks=TRAIN_SPEC, out="", limit=96, max_new_tokens=96)  # batch: from free memory


def _loop_train() -> TrainConfig:
    return TrainConfig(mode="opsd", lr=5e-5, warmup_steps=2, epochs=1.0, batch_size=8, teacher="initial",
                       precompute_targets=True)


@dataclass
class LoopConfig:
    out: str = field(default="runs/loop", metadata={"help": "output folder: round_K/ per round, loop.json, loop.md"})
    rounds: int = field(default=3, metadata={"help": "rollout -> critique -> train rounds (at most; see early_stop)"})
    tasks: str = field(default="", metadata={
        "help": "BFCL categories for every stage, bfcl:CAT[,CAT...] (e.g. bfcl:multi_turn_base): rounds draw from "
                "their train split, validation scores their validation split (and the demo their heldout split); "
                "'' = rollout.tasks and validation_tasks as given"})
    fresh_tasks: bool = field(default=True, metadata={
        "help": "each round trains on the next rollout.limit tasks of a seeded shuffle of rollout.tasks "
                "(--no-fresh-tasks: the same tasks every round)"})
    validation_tasks: str = field(default=VALIDATION_SPEC, metadata={
        "help": "tasks that score every round (never the held-out split); '' = no validation, no early stop; "
                "multi-turn rollout.tasks (bfcl:multi_turn_...): the default becomes their validation split"})
    validation_limit: int = field(default=64, metadata={"help": "validation tasks (a stratified sample)"})
    early_stop: bool = field(default=True, metadata={
        "help": "stop when the validation outcome gets worse than the best round so far"})
    cold_start_steps: int = field(default=0, metadata={
        "help": "off-policy cold start before round 1: SFT steps on the ground-truth calls of cold_start_tasks "
                "(0 = off); the cold-started model is scored as round 0"})
    cold_start_lr: float = field(default=3e-5, metadata={"help": "learning rate of the cold start's SFT steps"})
    cold_start_tasks: str = field(default="", metadata={
        "help": "tasks with ground truth for the cold start ('' = rollout.tasks, the rounds' train split)"})
    ceiling: bool = field(default=True, metadata={
        "help": "every round: decode greedily with each critique's hint in view and score it (the hinted teacher's "
                "ceiling, OUT/round_K/ceiling/; single-turn tasks)"})
    train_on: str = field(default="all", metadata={
        "help": "the critiqued replies a round trains on: all | fixes (its hinted teacher's greedy decode no longer "
                "makes the hinted error, and parses) | correct (that decode is officially correct); the last two read the ceiling"})
    rollout: RolloutConfig = field(default_factory=_loop_rollout, metadata={
        "help": "training rollouts: tasks is the spec rounds draw from, limit the tasks per round; out and model "
                "are set by the loop"})
    critic: CriticConfig = field(default_factory=CriticConfig, metadata={"help": "the critic of every round"})
    train: TrainConfig = field(default_factory=_loop_train, metadata={
        "help": "training of every round; train.model is the initial student; trajectories, critiques and out are "
                "set by the loop"})
    serve: bool = field(default=False, metadata={
        "help": "roll out through a vLLM server (make vllm): token-exact /v1/completions, each round's student "
                "hot-loaded as a LoRA adapter (--train.lora-r > 0) or served by a restart on its weights"})
    server: ServeConfig = field(default_factory=ServeConfig, metadata={
        "help": "the vLLM server of --serve; model and log are set by the loop"})

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds: must be >= 1, got {self.rounds}")
        if self.validation_limit < 1:
            raise ValueError(f"validation_limit: must be >= 1, got {self.validation_limit}")
        if self.rollout.limit is None or self.rollout.limit < 1:
            raise ValueError("rollout.limit: the tasks per round, must be >= 1")
        if self.train_on != "all" and (self.train_on not in TEACHER_CHECKS or not self.ceiling):
            raise ValueError(f"train_on: all, or {' / '.join(TEACHER_CHECKS)} with ceiling on; got {self.train_on!r}")
        if self.cold_start_steps < 0 or not self.cold_start_lr > 0:
            raise ValueError(f"cold_start_steps >= 0 and cold_start_lr > 0, got {self.cold_start_steps} and "
                             f"{self.cold_start_lr}")
        if self.tasks:
            parts = self.tasks.split(":")
            if len(parts) not in (2, 3) or parts[0] != "bfcl" or not parts[1] or parts[2:] not in ([], ["train"]):
                raise ValueError(f"tasks: BFCL categories, bfcl:CAT[,CAT...] (each stage takes its own split), got "
                                 f"{self.tasks!r}; give a task file as --rollout.tasks instead")
            train = f"bfcl:{parts[1]}:train"
            if self.rollout.tasks not in (TRAIN_SPEC, train):
                raise ValueError(f"tasks, rollout.tasks: give one of them (got {self.tasks!r} and {self.rollout.tasks!r})")
            self.rollout.tasks = train
            if self.validation_tasks == VALIDATION_SPEC:
                self.validation_tasks = f"bfcl:{parts[1]}:validation"
        if self.validation_tasks == VALIDATION_SPEC and multi_turn_split(self.rollout.tasks, "validation"):
            self.validation_tasks = multi_turn_split(self.rollout.tasks, "validation")
        defaults = {"rollout": RolloutConfig(), "train": TrainConfig(), "server": ServeConfig()}
        set_here = [f"{stage}.{name}" for stage, names in PIPELINE_FIELDS.items() for name in names
                    if getattr(getattr(self, stage), name) not in ("", None, self.train.model,
                                                                   getattr(defaults[stage], name))]
        if set_here:
            raise ValueError(f"{', '.join(set_here)}: set by the loop for every round; give the initial student as "
                             "--train.model and the output folder as --out")
        check_off_heldout({"rollout.tasks": self.rollout.tasks, "validation_tasks": self.validation_tasks,
                           "cold_start_tasks": self.cold_start_tasks})


def round_tasks(spec: str, k: int, per_round: int, *, seed: int, fresh: bool) -> list[Task]:
    """Round k's training tasks: slice k of a seeded shuffle of every task of `spec` (wrapping around)."""
    tasks = load_tasks(spec)
    order = list(range(len(tasks)))
    random.Random(f"loop:{seed}").shuffle(order)
    start = (k * per_round if fresh else 0) % max(1, len(tasks))
    picked = [order[(start + i) % len(order)] for i in range(min(per_round, len(order)))]
    return [tasks[i] for i in picked]


def rollout_config(cfg: LoopConfig, model: str, served: str | None, server, **kw) -> RolloutConfig:
    """The loop's rollout settings for `model`: in-process (hf), or token-exact through the server under `served`."""
    if server is None:
        return dataclasses.replace(cfg.rollout, model=model, **kw)
    return dataclasses.replace(cfg.rollout, model=model, backend="completions", base_url=server.base_url,
                               api_model=served, **kw)


def validate(model: str, cfg: LoopConfig, out: Path, critique: Callable, prefill: str, *, served: str | None = None,
             server=None) -> Validation:
    """Greedy rollouts of `model` on the validation tasks, critiqued; outcomes read from every reply."""
    rcfg = rollout_config(cfg, model, served, server, tasks=cfg.validation_tasks, limit=cfg.validation_limit,
                          out=str(out / "rollouts.jsonl"), samples=1, temperature=0.0, prefill=prefill)
    rollout_main(rcfg)
    trajs = load_rollouts(rcfg)
    crits = critique(trajs, out / "critiques.jsonl")
    return summarise_validation(trajs, crits)


def training_key(tcfg: TrainConfig) -> str:
    """What a training run's result depends on: its settings, the CONTENT of its input files (trajectories,
    critiques: a path rewritten with other data is another run) and the starting weights (a local dir's files)."""
    inputs = {p: file_digest(p) for p in as_paths(tcfg.trajectories) + as_paths(tcfg.critiques)}
    models = {m: fingerprint(m) for m in (tcfg.model, tcfg.teacher_model) if m}
    # options added later, off: the key that runs trained before them had (they are reused)
    config = {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in ADDED_OFF or ADDED_OFF[k] != v}
    return content_hash({"config": config, "inputs": inputs, "models": models})


def file_digest(path: str) -> str:
    """sha256 of a file's bytes ("missing" when there is none)."""
    if not Path(path).is_file():
        return "missing"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trained(tcfg: TrainConfig, marker: Path) -> str:
    """The round's trained model: trained now, or read from `marker` when this exact training, on these exact
    inputs, finished before (a rerun must not train, or touch the saved weights, again)."""
    key = training_key(tcfg)
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("config") == key and Path(done["model"]).exists():
            return done["model"]
    started = marker.with_name("started.json")
    if tcfg.resume and not (started.exists() and json.loads(started.read_text()).get("config") == key):
        # the folder's checkpoints and examples are another training's (other inputs): start over, never resume them
        shutil.rmtree(Path(tcfg.out) / "checkpoints", ignore_errors=True)
        tcfg = dataclasses.replace(tcfg, resume=False)
    started.parent.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps({"config": key}))
    model = str(train_main(tcfg))
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"config": key, "model": model}))
    return model


def _hint_summary(train_out: Path) -> dict:
    """Error mix and hint effect of a round's training data (data.json, examples.jsonl of `opsd train`)."""
    data = json.loads((train_out / "data.json").read_text()) if (train_out / "data.json").exists() else {}
    rows = list(read_jsonl(train_out / "examples.jsonl")) if (train_out / "examples.jsonl").exists() else []
    for r in rows:
        r.setdefault("category", (r.get("meta") or {}).get("category"))
    kept = [r for r in rows if "hint_effect" in r and "hint_effect_first" in r]
    return {"built": data.get("built"), "kept": data.get("kept"), "hint_effect_mean": data.get("hint_effect_mean"),
            "kept_by_category": {c.category: {"n": c.n, "hint_effect": c.mean} for c in category_effects(kept)}}


def main(cfg: LoopConfig, *, echo: Callable[[str], None] = print) -> dict:
    """Run the rounds (see module docstring); returns what OUT/loop.json holds."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.serve:
        return rounds(cfg, echo=echo)
    server = VLLMServer(dataclasses.replace(cfg.server, model=cfg.train.model, log=str(out / "server.log")))
    echo(f"[loop] starting vLLM for {cfg.train.model} (log: {out / 'server.log'})")
    server.start()
    try:
        return rounds(cfg, echo=echo, server=server)
    finally:
        server.stop()


class Stages:
    """Wall seconds per named stage of this run (`with stages("rollout"): ...`); a stage reused from disk costs ~0."""

    def __init__(self) -> None:
        self.wall_s: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.wall_s[name] = round(self.wall_s.get(name, 0.0) + time.perf_counter() - t, 1)


def rounds(cfg: LoopConfig, *, echo: Callable[[str], None] = print, server=None) -> dict:
    """The rounds, with rollouts in-process or through `server` (a started VLLMServer)."""
    out = Path(cfg.out)
    critique = critique_fn(cfg.critic, echo=echo)
    base = cfg.train.model
    prefill = RolloutConfig(model=base, prefill=cfg.rollout.prefill).resolved_prefill()
    stages = Stages()  # wall seconds per stage, the rounds' summed (loop.json "wall_s")
    history: dict = {"config": redacted(cfg), "rounds": [], "best_round": 0, "best_model": base,
                     "stopped_early": False, "wall_s": stages.wall_s}
    best: Validation | None = None
    student, served = base, (server.model_name if server is not None else None)
    if cfg.validation_tasks:
        echo(f"[loop] validation of the initial student {base}")
        with stages("validation"):
            best = validate(base, cfg, out / "base_validation", critique, prefill, served=served, server=server)
        history["base_validation"] = dataclasses.asdict(best)
    if cfg.cold_start_steps:
        if server is not None:
            raise ValueError("cold_start_steps: not with --serve yet (the server holds the base weights); run the "
                             "cold start with `opsd train --mode sft` and pass its model as --train.model")
        with stages("cold_start"):
            cs = cold_start(cfg.cold_start_tasks or cfg.rollout.tasks, cfg.train, model=base, out=out / "cold_start",
                            steps=cfg.cold_start_steps, lr=cfg.cold_start_lr, trained=trained, echo=echo)
        student = cs["model"]
        rec0 = {"round": 0, "student": base, "trained_model": student, "cold_start": cs,
                "train_dir": str(out / "cold_start" / "train")}
        if cfg.validation_tasks:
            with stages("validation"):
                v = validate(student, cfg, out / "cold_start" / "validation", critique, prefill)
            rec0["validation"] = dataclasses.asdict(v)
            echo(f"[loop cold start] validation: accuracy {v.accuracy:.3f}, replies with an error {v.error_rate:.3f} "
                 f"(n={v.n})")
            if v.better_than(best):
                best, history["best_round"], history["best_model"] = v, 0, student
        else:
            history["best_model"] = student
        history["cold_start"] = rec0
    for k in range(1, cfg.rounds + 1):
        rd = out / f"round_{k}"
        tasks = round_tasks(cfg.rollout.tasks, k - 1, cfg.rollout.limit, seed=cfg.rollout.seed, fresh=cfg.fresh_tasks)
        write_records(rd / "tasks.jsonl", (dataclasses.asdict(t) for t in tasks))
        echo(f"[loop round {k}] rollouts of {student} on {len(tasks)} tasks")
        rcfg = rollout_config(cfg, student, served, server, tasks=str(rd / "tasks.jsonl"), limit=None, out="",
                              seed=cfg.rollout.seed + k - 1, prefill=prefill)
        # one file per rollout and critic config: training reads each whole, so a changed setting never mixes in
        rcfg.out = str(rd / f"rollouts-{rcfg.hash()}-{content_hash([t.id for t in tasks])[:6]}.jsonl")  # + the tasks
        crit_path = rd / f"critiques-{content_hash(dataclasses.asdict(cfg.critic))[:10]}.jsonl"
        with stages("rollout"):
            rollout_main(rcfg)
        trajs = load_rollouts(rcfg)
        with stages("critique"):
            crits = critique(trajs, crit_path)
        mix = Counter(c.category or "unknown" for c in crits if c.verdict == "error")
        rec = {"round": k, "student": student, "tasks": len(tasks), "errors": sum(mix.values()),
               "error_mix": dict(mix.most_common()),
               "critique_failed": sum(c.verdict == "failed" for c in crits)}
        if cfg.ceiling and not any(mt.is_multi_turn(t.meta) for t in trajs):
            with stages("ceiling"):
                rec["ceiling"] = run_ceiling(trajs, crits, rollout=rcfg, critique=critique, out=rd / "ceiling")
            echo(f"[loop round {k}] {format_ceiling(rec['ceiling'])}")
        if cfg.train_on != "all":  # the replies whose hinted teacher acted on the hint, in a file of their own
            crits, crit_path = teacher_verified(rec.get("ceiling", {}), crits, cfg.train_on, crit_path)
            mix = Counter(c.category for c in crits if c.verdict == "error")
        if not mix:
            echo(f"[loop round {k}] no errors left to learn from; stopping")
            history["rounds"].append(rec)
            break
        echo(f"[loop round {k}] training on {sum(mix.values())} of {rec['errors']} critiqued errors (train_on={cfg.train_on})")
        tcfg = dataclasses.replace(cfg.train, model=student, trajectories=rcfg.out, critiques=str(crit_path),
                                   out=str(rd / "train"), resume=True)
        with stages("train"):
            student = trained(tcfg, rd / "train" / "done.json")
        rec |= {"trained_model": student, "training": _hint_summary(rd / "train"), "train_dir": str(rd / "train")}
        if server is not None:  # the new student answers the next requests; a failed load stops here (ServerError)
            served = (publish_adapter(server, rd / "train", previous=served, label=f"round_{k}") if cfg.train.lora_r
                      else publish_full_weights(server, student))
            rec["served_as"] = served
        if cfg.validation_tasks:
            with stages("validation"):
                v = validate(student, cfg, rd / "validation", critique, prefill, served=served, server=server)
            rec["validation"] = dataclasses.asdict(v)
            echo(f"[loop round {k}] validation: accuracy {v.accuracy:.3f}, replies with an error {v.error_rate:.3f} "
                 f"(n={v.n})")
            if v.better_than(best):
                best, history["best_round"], history["best_model"] = v, k, student
            elif cfg.early_stop and v.worse_than(best):
                history["rounds"].append(rec)
                history["stopped_early"] = True
                echo(f"[loop round {k}] validation got worse than the best round; stopping")
                break
        else:
            history["best_round"], history["best_model"] = k, student
        history["rounds"].append(rec)
        _write(out, history)
    _write(out, history)
    return history


def format_rounds(history: dict) -> str:
    """Markdown table: one row per round (the base student first)."""
    lines = ["| round | student | errors (train) | top errors | hint effect | kept | hinted teacher decoding: accuracy "
             "(student) | val. accuracy [95% CI] | val. names the right function | val. replies with an error [95% CI] "
             "| val. undeclared name |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def val(v: dict | None) -> str:
        if not v:
            return "n/a | n/a | n/a | n/a"
        a, e = v["accuracy_ci"], v["error_rate_ci"]
        return (f"{v['accuracy']:.3f} [{a[0]:.3f}, {a[1]:.3f}] (n={v['n']}) | {v.get('gt_function', 0.0):.3f} | "
                f"{v['error_rate']:.3f} "
                f"[{e[0]:.3f}, {e[1]:.3f}] | {v['undeclared_name']:.3f}")

    def ceiling(c: dict | None) -> str:
        if not c:
            return "n/a"
        a = c["accuracy_all"]
        return f"{100 * a['after']['rate']:.1f}% ({100 * a['before']['rate']:.1f}%), n={a['n']}"

    lines.append(f"| base | {history['config']['train']['model']} | | | | | | {val(history.get('base_validation'))} |")
    if history.get("cold_start"):
        r = history["cold_start"]
        cs = r["cold_start"]
        lines.append(f"| cold start | {r['trained_model']} | SFT: {cs['examples']} ground-truth calls, {cs['steps']} "
                     f"steps, lr {cs['lr']:g} | | | | | {val(r.get('validation'))} |")
    for r in history["rounds"]:
        t = r.get("training") or {}
        top = ", ".join(f"{c} {n}" for c, n in list(r["error_mix"].items())[:3])
        he = t.get("hint_effect_mean")
        lines.append(f"| {r['round']} | {r.get('trained_model', '-')} | {r['errors']}/{r['tasks']} | {top} | "
                     f"{'n/a' if he is None else f'{he:+.3f}'} | {t.get('kept', 'n/a')} | {ceiling(r.get('ceiling'))} | "
                     f"{val(r.get('validation'))} |")
    lines.append(f"\nbest round: {history['best_round']} ({history['best_model']})"
                 + ("; stopped early: validation got worse" if history.get("stopped_early") else ""))
    return "\n".join(lines)


def _write(out: Path, history: dict) -> None:
    (out / "loop.json").write_text(json.dumps(history, indent=2, default=str))
    (out / "loop.md").write_text("# opsd loop\n\n" + format_rounds(history) + "\n")
