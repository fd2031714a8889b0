"""Multi-turn OPSD end to end on BFCL multi_turn_base: rollouts on the train split -> critiques -> training ->
evaluation on the held-out split (BFCL's official multi-turn checker), plus where the base model's first errors sit.

    flock /tmp/opsd-torch.lock .venv/bin/python scripts/multi_turn_run.py --out runs/multi_turn \
        --train-limit 12 --eval-limit 12

Every stage is resumable (rerun the same command). Writes OUT/summary.json and prints it; the held-out report is
OUT/report/report.md. The numbers in RESULTS.md ("Multi-turn") come from this script.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from opsd.critique.config import CriticConfig
from opsd.critique.run import critique_fn
from opsd.eval.config import EvalConfig
from opsd.eval.multi_turn import episode_outcome, position_summary
from opsd.eval.multi_turn import main as eval_main
from opsd.rollout.run import RolloutConfig, load_rollouts
from opsd.rollout.run import main as rollout_main
from opsd.train.config import TrainConfig
from opsd.train.run import main as train_main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/multi_turn")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--category", default="multi_turn_base")
    p.add_argument("--train-limit", type=int, default=12)
    p.add_argument("--eval-limit", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-steps-per-turn", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rcfg = RolloutConfig(tasks=f"bfcl:{a.category}:train", out=str(out / "rollouts.jsonl"), model=a.model,
                         limit=a.train_limit, max_new_tokens=a.max_new_tokens, max_steps_per_turn=a.max_steps_per_turn,
                         device=a.device)
    print("rollouts:", rollout_main(rcfg), flush=True)
    trajs = load_rollouts(rcfg)
    critique = critique_fn(CriticConfig(name="schema+reference"), progress=False)
    crits = critique(trajs, out / "critiques.jsonl")
    by_id = {c.trajectory_id: c for c in crits}
    train_outcomes = [episode_outcome(t, by_id.get(t.id)) for t in trajs]
    t1 = time.time()
    run = out / "train"
    if not (run / "model").is_dir():
        train_main(TrainConfig(model=a.model, trajectories=rcfg.out, critiques=str(out / "critiques.jsonl"),
                               out=str(run), lr=a.lr, epochs=a.epochs, batch_size=2, grad_accum=4,
                               gradient_checkpointing=True, progress=False))
        # 8 examples per step, 2 at a time with activations recomputed: a multi-turn example is ~4k tokens, and
        # without checkpointing 2 of them took ~20 GB on CPU
    t2 = time.time()
    ecfg = EvalConfig(before=a.model, after=str(run / "model"), tasks=f"bfcl:{a.category}:heldout",
                      limit=a.eval_limit, out=str(out / "report"), max_new_tokens=a.max_new_tokens, device=a.device)
    report = eval_main(ecfg, critique, max_steps_per_turn=a.max_steps_per_turn)
    base_outcomes = train_outcomes + [x["before"] for x in report["per_task"]]
    data = json.loads((run / "data.json").read_text()) if (run / "data.json").exists() else None
    summary = {
        "settings": vars(a), "seconds": {"train_rollouts_and_critiques": round(t1 - t0), "training": round(t2 - t1),
                                         "evaluation": round(time.time() - t2)},
        "train": {"episodes": len(trajs), "critics": {v: sum(o["critic"] == v for o in train_outcomes)
                                                      for v in ("ok", "error", "failed")},
                  "official_valid": sum(o["valid"] for o in train_outcomes), "training_data": data},
        "heldout": {k: report[k] for k in ("n_paired", "accuracy", "critic_error", "steps", "finish_reasons",
                                           "official_error_types", "critic_verdicts", "first_error_position")},
        "teacher_forced": {k: v for k, v in report["teacher_forced"].items() if k != "per_example"},
        "base_model_first_error_position": position_summary(base_outcomes),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
