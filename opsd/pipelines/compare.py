"""`opsd compare` (= `make compare`): OPSD against the obvious alternatives on the same budget.

    opsd compare                                       # embedded SmolLM2-135M-Instruct, CPU, every method
    opsd compare --methods opsd,reward --lrs 5e-5 --steps 12 --heldout-limit 256

Every method starts from the same student and gets the same data and budget:
1. the same rollouts: `samples` sampled replies per training task (temperature `temperature`), critiqued
   once by the same critic (OUT/rollouts-KEY.jsonl, OUT/critiques-KEY-CRITIC.jsonl: a file per rollout config);
2. the same number of optimizer steps (`steps` x `train.batch_size`), for each learning rate of `lrs`;
3. the learning rate picked on the validation split (greedy rollouts; official accuracy, then replies whose
   parseable call names the ground-truth function, then parseable replies, then replies with an error: the
   `opsd loop` order, `Validation.better_than`), never on the held-out split;
4. the same held-out tasks, scored once per method: paired against the base student and against `opsd`.

The methods (`METHODS`):
- `opsd`: the hinted teacher (the student at the start, frozen), on the error span only (this project);
- `dense`: the same hint and teacher on the whole erroneous reply (SDFT / OpenClaw-RL style hinted
  self-distillation);
- `random-span`: the same hint, teacher and examples as `opsd`, but the trained tokens are as many as the error's,
  at a seeded random place in the same reply: the matched-count control that tells whether the critic's
  localisation, not the amount of distillation, is what helps;
- `reward`: REINFORCE with the critic's verdict as the only reward (1: no error and a parseable call, else 0),
  baseline the mean over the `samples` replies of the same task; offline, on the shared rollouts;
- `rft`: rejection-sampling fine-tuning: SFT on the replies the critic passes;
- `sft-gt`: SFT on the ground-truth calls. It uses information the others do not have: a reference, not a
  competitor.
A method left without training data (no reply passed, or every task's replies got the same reward) is reported
as such, not trained.

Outputs: OUT/compare.json and OUT/compare.md (one row per method: official accuracy, replies with an error,
every error category, the per-token KL to the base on ground-truth calls, forgetting (`opsd.eval.forgetting`:
KL(base || tuned) on general questions), wall time; each with a paired 95% CI against the base and against
`opsd`), OUT/tradeoff.png (accuracy gain against forgetting, one point per method), OUT/<method>/lr_<lr>/ per run.
With `--seeds 0,1,2` the whole comparison runs once per seed (rollout sampling and data order) in OUT/seed_S/,
and OUT/seeds.md pairs every seed and pools them. Rerunning resumes from what is on disk.

Start it from a cold-started student (`--train.model runs/demo/cold_start/train/model`) so that `reward` and
`rft` see replies that pass.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from opsd.critique.config import CriticConfig
from opsd.critique.outcomes import reply_outcomes
from opsd.critique.run import critique_fn
from opsd.eval.config import EvalConfig
from opsd.eval.forgetting import base_replies, forgetting_kl
from opsd.eval.metrics import HEADLINE, per_task_outcomes
from opsd.eval.run import gt_call, gt_call_collateral
from opsd.io import models
from opsd.io.tasks import load_tasks
from opsd.io.tasks.overlap import check_off_heldout
from opsd.pipelines.compare_report import format_compare, method_row
from opsd.pipelines.compare_seeds import format_tradeoff, tradeoff_plot, write_seeds
from opsd.pipelines.demo import HELDOUT_SPEC
from opsd.pipelines.loop import TRAIN_SPEC, VALIDATION_SPEC, Validation, file_digest, summarise_validation, trained
from opsd.redact import redacted
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import load_rollouts
from opsd.rollout.run import main as rollout_main
from opsd.train.config import TrainConfig
from opsd.types import Critique, Trajectory, content_hash

METHODS = ("opsd", "dense", "random-span", "reward", "rft", "sft-gt")
REFERENCE_ONLY = ("sft-gt",)  # uses the ground truth: reported, never a competitor
SET_BY_COMPARE = ("mode", "trajectories", "critiques", "out", "lr", "max_steps", "span")


def _compare_train() -> TrainConfig:
    return TrainConfig(batch_size=8, warmup_steps=1, teacher="initial")


@dataclass
class CompareConfig:
    out: str = field(default="runs/compare", metadata={"help": "output folder: compare.json, compare.md, METHOD/lr_LR/"})
    methods: str = field(default=",".join(METHODS), metadata={
        "help": "comma-separated, from: opsd (hinted teacher, error span only) | dense (same hint, whole reply) | "
                "reward (REINFORCE on the critic's verdict) | rft (SFT on the replies the critic passes) | "
                "sft-gt (SFT on ground-truth calls: a reference, it sees the answers)"})
    tasks: str = field(default=TRAIN_SPEC, metadata={"help": "training tasks (the rollouts every method learns from)"})
    limit: int = field(default=32, metadata={"help": "training tasks (a stratified sample of --tasks)"})
    samples: int = field(default=4, metadata={"help": "sampled replies per training task (>= 4: reward's per-task baseline)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the training rollouts"})
    lrs: str = field(default="3e-5,1e-4", metadata={"help": "learning rates swept for every method (comma-separated)"})
    steps: int = field(default=8, metadata={"help": "optimizer steps of every run (batch: --train.batch-size)"})
    validation_tasks: str = field(default=VALIDATION_SPEC, metadata={"help": "picks each method's learning rate"})
    validation_limit: int = field(default=32, metadata={"help": "validation tasks"})
    heldout_tasks: str = field(default=HELDOUT_SPEC, metadata={"help": "scored once per method at the end"})
    heldout_limit: int = field(default=128, metadata={"help": "held-out tasks"})
    max_new_tokens: int = field(default=96, metadata={"help": "rollout budget per reply (training, validation, held-out)"})
    rollout_batch_size: int = field(default=0, metadata={"help": "rollout batch (0 = from free memory)"})
    prefill: str | None = field(default=None, metadata={"escapes": True, "help": "reply prefill; None = the student's own"})
    seed: int = field(default=0, metadata={"help": "sampling seed of the training rollouts"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for every paired 95% CI"})
    forgetting_prompts: int = field(default=64, metadata={
        "help": "general questions (BFCL irrelevance, asked without tools) of the forgetting probe; 0 = off"})
    seeds: str = field(default="", metadata={
        "help": "comma-separated seeds (rollout sampling and data order: --seed and --train.seed of each run); "
                "several run the comparison once each in OUT/seed_S/ and pool them in OUT/seeds.md; '' = --seed only"})
    critic: CriticConfig = field(default_factory=CriticConfig, metadata={"help": "the critic of every method"})
    train: TrainConfig = field(default_factory=_compare_train, metadata={
        "help": "settings every run shares; train.model is the student; " + ", ".join(SET_BY_COMPARE)
                + " are set by compare"})

    def __post_init__(self) -> None:
        unknown = [m for m in self.method_list if m not in METHODS]
        if unknown or not self.method_list:
            raise ValueError(f"methods: {', '.join(unknown) or 'none given'}; choose from {', '.join(METHODS)}")
        if self.samples < 4 and "reward" in self.method_list:
            raise ValueError(f"samples: reward needs >= 4 replies per task for its baseline, got {self.samples}")
        if min(self.limit, self.samples, self.steps, self.validation_limit, self.heldout_limit) < 1:
            raise ValueError("limit, samples, steps, validation_limit and heldout_limit must be >= 1")
        try:
            lrs = self.lr_list
        except ValueError:
            raise ValueError(f"lrs: comma-separated numbers, got {self.lrs!r}") from None
        if not lrs or any(not lr > 0 for lr in lrs):
            raise ValueError(f"lrs: positive learning rates, got {self.lrs!r}")
        d = TrainConfig()
        set_here = [f"train.{n}" for n in SET_BY_COMPARE if getattr(self.train, n) != getattr(d, n)]
        if set_here:
            raise ValueError(f"{', '.join(set_here)}: set by compare for every method (use --lrs and --steps)")
        check_off_heldout({"tasks": self.tasks, "validation_tasks": self.validation_tasks}, heldout=self.heldout_tasks)

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @property
    def lr_list(self) -> list[float]:
        return [float(x) for x in self.lrs.split(",") if x.strip()]


# ---------------------------------------------------------------- shared data

def passes(traj: Trajectory, crit: Critique) -> bool:
    """The critic's verdict as a reward: no error found and the reply holds a parseable call."""
    return crit.verdict == "ok" and not traj.meta.get("parse_error")


def write_trajectories(trajs: list[Trajectory], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in trajs))
    return str(path)


def method_data(trajs: list[Trajectory], crits: list[Critique], out: Path, *, rollouts: str | None = None,
                critiques: str | None = None) -> dict[str, dict]:
    """Each method's training files and what they hold (counts), from the shared rollouts and critiques (the files
    `rollouts` and `critiques` hold exactly `trajs` and `crits`; default OUT/rollouts.jsonl, OUT/critiques.jsonl)."""
    rollouts, critiques = rollouts or str(out / "rollouts.jsonl"), critiques or str(out / "critiques.jsonl")
    judged = [(t, c) for t, c in zip(trajs, crits) if c.verdict in ("ok", "error")]  # a failed critique: no verdict
    errors = sum(c.verdict == "error" for _, c in judged)
    rewarded = [Trajectory(t.id, t.messages, t.tools, {**t.meta, "reward": float(passes(t, c))}) for t, c in judged]
    passed = [t for t, c in judged if passes(t, c)]
    by_task: dict[str, set] = {}
    for t in rewarded:
        by_task.setdefault(str(t.meta.get("task_id", t.id)), set()).add(t.meta["reward"])
    signal = sum(len(by_task[str(t.meta.get("task_id", t.id))]) > 1 for t in rewarded)  # advantage != 0
    gt, seen = [], set()
    for t in trajs:
        tid, truth = t.meta.get("task_id", t.id), t.meta.get("ground_truth")
        if truth and tid not in seen:
            seen.add(tid)
            gt.append(Trajectory(f"{tid}#gt", t.messages[:-1] + [{"role": "assistant", "content": None,
                                                                  "tool_calls": gt_call(truth)}], t.tools, dict(t.meta)))
    return {
        "opsd": {"mode": "opsd", "span": "quote", "trajectories": rollouts, "critiques": critiques, "examples": errors,
                 "critiqued_errors": errors},  # examples: replaced by what training kept (data.json) once trained
        "dense": {"mode": "opsd", "span": "step", "trajectories": rollouts, "critiques": critiques, "examples": errors,
                 "critiqued_errors": errors},  # examples: replaced by what training kept (data.json) once trained
        "random-span": {"mode": "opsd", "span": "random", "trajectories": rollouts, "critiques": critiques,
                        "examples": errors, "critiqued_errors": errors},  # kept: the same examples as opsd
        "reward": {"mode": "reinforce", "trajectories": write_trajectories(rewarded, out / "data" / "reward.jsonl"),
                   "examples": signal, "replies": len(rewarded), "passed": len(passed)},
        "rft": {"mode": "sft", "trajectories": write_trajectories(passed, out / "data" / "rft.jsonl"),
                "examples": len(passed)},
        "sft-gt": {"mode": "sft", "trajectories": write_trajectories(gt, out / "data" / "sft_gt.jsonl"),
                   "examples": len(gt)},
    }


def rollout_config(cfg: CompareConfig, model: str, out: Path, *, tasks: str, limit: int, prefill: str,
                   samples: int = 1, temperature: float = 0.0) -> RolloutConfig:
    """The rollout settings, written to OUT-<key>.jsonl: one file per rollout config, tasks (a task file's content),
    limit and samples. Training reads its file whole, so a rerun with other settings into the same --out (e.g.
    --samples 8 after --samples 4) neither mixes lines of both nor trains on the old ones."""
    rcfg = RolloutConfig(tasks=tasks, limit=limit, model=model, out=str(out), samples=samples, temperature=temperature,
                         seed=cfg.seed, prefill=prefill, max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.rollout_batch_size, precision=cfg.train.precision)
    key = content_hash({"rollout": rcfg.hash(), "tasks": tasks, "limit": limit, "samples": samples,
                        "tasks_file": None if tasks.startswith("bfcl:") else file_digest(tasks)})[:10]
    rcfg.out = str(out.with_name(f"{out.stem}-{key}{out.suffix}"))
    return rcfg


def critiques_path(rcfg: RolloutConfig, critic: CriticConfig) -> Path:
    """The critiques of one rollout file by one critic: a file of their own (training reads it whole)."""
    out = Path(rcfg.out)
    return out.with_name(f"critiques-{out.stem.rsplit('-', 1)[-1]}-{content_hash(dataclasses.asdict(critic))[:10]}.jsonl")


def rollouts(cfg: CompareConfig, model: str, out: Path, **kw) -> list[Trajectory]:
    """Roll out (or resume) `rollout_config(cfg, model, out, **kw)`; its trajectories."""
    rcfg = rollout_config(cfg, model, out, **kw)
    rollout_main(rcfg)
    return load_rollouts(rcfg)


# ---------------------------------------------------------------- training and the learning-rate pick

def train_config(cfg: CompareConfig, data: dict, lr: float, out: Path) -> TrainConfig:
    kw = {k: v for k, v in data.items() if k in ("mode", "span", "trajectories", "critiques")}
    if kw.get("span", "quote") != "quote":  # --train.anchor weighs the reply around the error span: opsd's alone
        kw["anchor"] = 0.0
    return dataclasses.replace(cfg.train, **kw, lr=lr, max_steps=cfg.steps, out=str(out / "train"), resume=True)


def run_method(cfg: CompareConfig, method: str, data: dict, critique: Callable, prefill: str, base_val: Validation,
               out: Path, echo: Callable[[str], None]) -> dict:
    """Train the method at every learning rate, score each on the validation split; the best run is picked."""
    rec: dict = {"method": method, "data": {k: v for k, v in data.items()
                                            if k in ("examples", "critiqued_errors", "replies", "passed")},
                 "runs": []}
    if not data["examples"]:
        why = {"reward": "every task's replies got the same reward (no REINFORCE signal)",
               "rft": "no reply passed the critic"}.get(method, "no critiqued errors")
        echo(f"[compare {method}] not trained: {why}")
        return rec | {"status": "no training data", "reason": why}
    best: tuple[Validation, dict] | None = None
    for lr in cfg.lr_list:
        run_dir = out / method / f"lr_{lr:g}"
        tcfg = train_config(cfg, data, lr, run_dir)
        echo(f"[compare {method}] training at lr {lr:g} ({cfg.steps} steps of {tcfg.batch_size})")
        t0 = time.time()
        try:
            model = trained(tcfg, run_dir / "train" / "done.json")
        except RuntimeError as e:  # "no usable examples": nothing for this method to learn from
            if "no usable examples" not in str(e):
                raise
            rec |= {"status": "no training data", "reason": str(e)}
            echo(f"[compare {method}] not trained: {e}")
            return rec
        wall = _train_wall(run_dir / "train", time.time() - t0)
        if (run_dir / "train" / "data.json").exists():  # the examples built and kept by the hint-effect filter
            rec["data"]["examples"] = json.loads((run_dir / "train" / "data.json").read_text()).get(
                "kept", rec["data"]["examples"])
        trajs = rollouts(cfg, model, run_dir / "validation" / "rollouts.jsonl", tasks=cfg.validation_tasks,
                         limit=cfg.validation_limit, prefill=prefill)
        v = summarise_validation(trajs, critique(trajs, run_dir / "validation" / "critiques.jsonl"))
        run = {"lr": lr, "model": model, "train_wall_s": wall, "validation": dataclasses.asdict(v)}
        rec["runs"].append(run)
        echo(f"[compare {method}] lr {lr:g}: validation accuracy {v.accuracy:.3f}, right function "
             f"{v.gt_function:.3f}, replies with an error {v.error_rate:.3f} (n={v.n}); trained in {wall:.0f} s")
        if best is None or v.better_than(best[0]):
            best = (v, run)
    rec |= {"status": "trained", "picked": best[1], "beats_base_on_validation": best[0].better_than(base_val)}
    return rec


def _train_wall(train_dir: Path, measured: float) -> float:
    """Wall time of a training run: measured now, or saved with the run when it was reused from disk."""
    path = train_dir / "wall.json"
    if path.exists() and measured < 5:
        return json.loads(path.read_text())["wall_s"]
    path.write_text(json.dumps({"wall_s": measured}))
    return measured


# ---------------------------------------------------------------- held-out

def heldout(cfg: CompareConfig, records: list[dict], critique: Callable, prefill: str, out: Path,
            echo: Callable[[str], None]) -> dict:
    """Every trained method and the base on the same held-out tasks, paired; the KL to the base on GT calls."""
    ecfg = EvalConfig(tasks=cfg.heldout_tasks, limit=cfg.heldout_limit, max_new_tokens=cfg.max_new_tokens,
                      batch_size=cfg.rollout_batch_size, bootstrap=cfg.bootstrap, out=str(out / "heldout"),
                      precision=cfg.train.precision, critic=cfg.critic)
    tasks = load_tasks(cfg.heldout_tasks, limit=cfg.heldout_limit)
    hd = out / "heldout"
    base = cfg.train.model
    echo(f"[compare held-out] base {base} on {len(tasks)} tasks")
    b_trajs = rollouts(cfg, base, hd / "rollouts_base.jsonl", tasks=cfg.heldout_tasks, limit=cfg.heldout_limit,
                       prefill=prefill)
    b_crits = critique(b_trajs, hd / "critiques_base.jsonl")
    scored: dict[str, tuple] = {}
    base_lm, tok = models.load(base, precision=cfg.train.precision)
    prefill_ids = tok(prefill, add_special_tokens=False)["input_ids"] if prefill else []
    for r in records:
        if r["status"] != "trained":
            continue
        m, model = r["method"], r["picked"]["model"]
        echo(f"[compare held-out] {m} ({model})")
        trajs = rollouts(cfg, model, hd / f"rollouts_{m}.jsonl", tasks=cfg.heldout_tasks, limit=cfg.heldout_limit,
                         prefill=prefill)
        crits = critique(trajs, hd / f"critiques_{m}.jsonl")
        per_task = per_task_outcomes(tasks, b_trajs, trajs, b_crits, crits, reply_outcomes)
        lm, _ = models.load(model, precision=cfg.train.precision)
        with torch.no_grad():
            _, kl = gt_call_collateral(base_lm, lm, tok, b_trajs, ecfg, prefill_ids)
        forgetting = None
        if cfg.forgetting_prompts:
            replies = base_replies(base, out.parent / "forgetting" if out.name.startswith("seed_") else out / "forgetting",
                                   n=cfg.forgetting_prompts, precision=cfg.train.precision)
            forgetting = forgetting_kl(base_lm, lm, replies, n_boot=cfg.bootstrap, seed=cfg.seed)
        del lm
        scored[m] = (trajs, crits, per_task, kl, forgetting)
    ref = scored.get("opsd")
    rows = {}
    for r in records:
        if r["method"] not in scored:
            rows[r["method"]] = {"status": r["status"], "reason": r.get("reason", "")}
            continue
        trajs, crits, per_task, kl, forgetting = scored[r["method"]]
        vs_opsd = None
        if ref is not None and r["method"] != "opsd":  # the same tasks in the same order: opsd's replies as "before"
            vs_opsd = [{"before": o["after"], "after": t["after"]} for o, t in zip(ref[2], per_task)]
        accurate = HEADLINE["official_accuracy"][1]
        rows[r["method"]] = method_row(per_task, vs_opsd, kl, bootstrap=cfg.bootstrap) | {
            "forgetting": forgetting,  # the pairs per task, for pooling seeds (opsd.pipelines.compare_seeds)
            "accuracy_pairs": [[bool(accurate(t["before"])), bool(accurate(t["after"]))] for t in per_task]}
    return {"n": len(tasks), "tasks": cfg.heldout_tasks, "rows": rows}


# ---------------------------------------------------------------- main

def main(cfg: CompareConfig, *, echo: Callable[[str], None] = print) -> dict:
    """Run the comparison (see module docstring); returns what OUT/compare.json holds, or with several --seeds
    what OUT/seeds.json holds (every seed's result and the pooled rows)."""
    seeds = [int(x) for x in cfg.seeds.split(",") if x.strip()]
    if len(seeds) <= 1:
        return run_one(dataclasses.replace(cfg, seed=seeds[0]) if seeds else cfg, echo=echo)
    results = []
    for s in seeds:
        echo(f"[compare seed {s}] ({seeds.index(s) + 1}/{len(seeds)})")
        results.append(run_one(dataclasses.replace(cfg, out=str(Path(cfg.out) / f"seed_{s}"), seed=s, seeds="",
                                                   train=dataclasses.replace(cfg.train, seed=s)), echo=echo))
    return write_seeds(Path(cfg.out), seeds, results, bootstrap=cfg.bootstrap, echo=echo)


def run_one(cfg: CompareConfig, *, echo: Callable[[str], None] = print) -> dict:
    """One comparison at one seed (see module docstring); returns what OUT/compare.json holds."""
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = cfg.train.model
    prefill = RolloutConfig(model=base, prefill=cfg.prefill).resolved_prefill()
    critique = critique_fn(cfg.critic, echo=echo)
    echo(f"[compare 1/4] {cfg.samples} sampled replies of {base} on {cfg.limit} tasks of {cfg.tasks}, critiqued")
    rcfg = rollout_config(cfg, base, out / "rollouts.jsonl", tasks=cfg.tasks, limit=cfg.limit, prefill=prefill,
                          samples=cfg.samples, temperature=cfg.temperature)
    rollout_main(rcfg)
    trajs = load_rollouts(rcfg)
    crit_path = critiques_path(rcfg, cfg.critic)
    crits = critique(trajs, crit_path)
    data = method_data(trajs, crits, out, rollouts=rcfg.out, critiques=str(crit_path))
    shared_s = time.time() - t0
    echo(f"[compare 2/4] validation of the base student on {cfg.validation_limit} tasks of {cfg.validation_tasks}")
    v_trajs = rollouts(cfg, base, out / "base_validation" / "rollouts.jsonl", tasks=cfg.validation_tasks,
                       limit=cfg.validation_limit, prefill=prefill)
    base_val = summarise_validation(v_trajs, critique(v_trajs, out / "base_validation" / "critiques.jsonl"))
    echo(f"[compare 3/4] {', '.join(cfg.method_list)} at lr {cfg.lrs}, {cfg.steps} steps each")
    records = [run_method(cfg, m, data[m], critique, prefill, base_val, out, echo) for m in cfg.method_list]
    echo("[compare 4/4] held-out evaluation, once per method")
    result = {"config": redacted(cfg), "shared": {"rollouts": len(trajs), "shared_wall_s": shared_s,
              "errors": sum(c.verdict == "error" for c in crits), "critique_failed": sum(c.verdict == "failed" for c in crits),
              "passed": data["reward"]["passed"]},
              "base_validation": dataclasses.asdict(base_val), "methods": records,
              "heldout": heldout(cfg, records, critique, prefill, out, echo), "wall_s": None}
    result["wall_s"] = time.time() - t0
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "compare.md").write_text(format_compare(result) + "\n\n" + format_tradeoff(result) + "\n")
    tradeoff_plot(result, out / "tradeoff.png")
    echo(format_compare(result))
    return result
