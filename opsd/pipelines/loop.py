"""`opsd loop --rounds R`: on-policy rounds of rollout -> critique -> train, each round starting
from the previous round's student. Every round's artifacts are kept under OUT/round_K/.

    opsd loop --rounds 3 --tasks bfcl:simple_python,multiple:train --limit 96 --out runs/loop

Rerunning the same command resumes: finished rounds are reused, an interrupted stage continues.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from opsd.critique.compose import add_critic_arguments, build_critic, critique_fn


def add_arguments(p) -> None:
    p.add_argument("--rounds", type=int, default=2, help="number of rollout->critique->train rounds")
    p.add_argument("--model", default="smollm2-135m-instruct", help="initial student")
    p.add_argument("--tasks", default="bfcl:simple_python,multiple:train", help="training tasks")
    p.add_argument("--limit", type=int, default=96, help="first N tasks per round")
    p.add_argument("--samples", type=int, default=1, help="samples per task")
    p.add_argument("--temperature", type=float, default=0.0, help="rollout temperature")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16, help="rollout batch size")
    p.add_argument("--prefill", default=None, help="reply prefill (default: from the initial model)")
    p.add_argument("--out", required=True, help="output folder (round_K/ per round)")
    p.add_argument("--config", default=None, help="training YAML config (opsd train --config), applied every round")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--min-hint-effect", type=float, default=0.0, help="hint-effect filter (nats; -inf keeps all)")
    p.add_argument("--device", default=None)
    add_critic_arguments(p)


def run(args) -> int:
    from opsd.rollout.run import RolloutConfig, load_rollouts, prefill_arg
    from opsd.rollout.run import main as rollout_main
    from opsd.train.config import TrainConfig, load_yaml
    from opsd.train.run import main as train_main

    if args.rounds < 1:
        print("error: --rounds must be >= 1", file=sys.stderr)
        return 2
    try:
        crit = critique_fn(build_critic(args), concurrency=args.critic_concurrency)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = RolloutConfig(model=args.model, prefill=prefill_arg(args.prefill))
    prefill = base.resolved_prefill()
    yaml_cfg = load_yaml(args.config) if args.config else {}
    student = args.model
    history = []
    for k in range(args.rounds):
        rd = Path(args.out) / f"round_{k}"
        print(f"[round {k}] student = {student}", flush=True)
        rcfg = RolloutConfig(tasks=args.tasks, out=str(rd / "rollouts.jsonl"), model=student, limit=args.limit,
                             samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, prefill=prefill, seed=k, device=args.device)
        rsum = rollout_main(rcfg)
        crits = crit(load_rollouts(rcfg), rd / "critiques.jsonl")
        n_err = sum(c.verdict == "error" for c in crits)
        rec = {"round": k, "student": student, "rollouts": rsum, "errors": n_err,
               "error_rate": n_err / max(1, len(crits))}
        if n_err == 0:
            print(f"[round {k}] no errors left to learn from; stopping", flush=True)
            history.append(rec)
            break
        fields = {"lr": args.lr, "epochs": args.epochs, "warmup_steps": 2, "min_hint_effect": args.min_hint_effect} | yaml_cfg
        tcfg = TrainConfig(**fields | {"model": student, "trajectories": rcfg.out, "critiques": str(rd / "critiques.jsonl"),
                                  "out": str(rd / "train"), "resume": True})
        try:
            student = str(train_main(tcfg))
        except RuntimeError as e:
            print(f"error: round {k} training failed: {e}", file=sys.stderr)
            return 1
        rec["trained_model"] = student
        history.append(rec)
        (Path(args.out) / "loop.json").write_text(json.dumps(history, indent=2))
    (Path(args.out) / "loop.json").write_text(json.dumps(history, indent=2))
    for rec in history:
        print(f"round {rec['round']}: error rate {rec['error_rate']:.3f} ({rec['errors']} errors) -> {rec.get('trained_model', '-')}")
    return 0
