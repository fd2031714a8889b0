"""`opsd demo` (= `make demo`): the whole OPSD loop on real BFCL tasks, end to end.

    opsd demo                                   # embedded SmolLM2-135M-Instruct, CPU, ~15 min
    opsd demo --model path/to/hf-chat-model --critic llm --base-url http://localhost:8000/v1 --critic-model M

1. rollouts of the student on the BFCL train split        -> OUT/rollouts/train.jsonl
2. critiques (schema+reference by default)               -> OUT/critiques/train.jsonl
3. OPSD training on the critiqued errors                  -> OUT/model/, OUT/metrics.jsonl, ...
4. evaluation on the disjoint held-out split (fresh rollouts of before and after, teacher-forced
   error-span metrics, collateral drift)                  -> OUT/report/
5. a before/after table printed at the end.
Every stage is resumable: rerunning the command reuses what is already on disk.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from opsd.critique.compose import add_critic_arguments, build_critic, critique_fn


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="student model (default: %(default)s)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    p.add_argument("--train-tasks", default="bfcl:simple_python,multiple:train", help="rollout tasks for training")
    p.add_argument("--train-limit", type=int, default=128, help="first N training tasks (default %(default)s)")
    p.add_argument("--samples", type=int, default=1, help="samples per training task (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="rollout temperature for training data")
    p.add_argument("--eval-tasks", default="bfcl:simple_python,multiple:heldout", help="held-out tasks")
    p.add_argument("--eval-limit", type=int, default=64, help="first N held-out tasks (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="rollout budget per reply (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="rollout batch size")
    p.add_argument("--prefill", default=None, help="reply prefill (default: '<tool_call>\\n' for the embedded model)")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs over the critiqued errors")
    p.add_argument("--lr", type=float, default=5e-5, help="training learning rate")
    p.add_argument("--train-batch-size", type=int, default=8, help="training batch size")
    p.add_argument("--span", default="quote", choices=["quote", "step_from_error", "step"], help="target span")
    p.add_argument("--loss", default="jsd", choices=["jsd", "forward_kl", "reverse_kl"])
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--teacher", default="initial", choices=["self", "initial", "ema"],
                   help="hinted teacher weights (default initial: frozen start, precomputed top-k targets)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--min-hint-effect", type=float, default=0.0,
                   help="keep examples whose hint lowers the error tokens by more than this (nats; -inf keeps all)")
    p.add_argument("--device", default=None)
    add_critic_arguments(p)


def run(args) -> int:
    from opsd.eval.report import summary_table
    from opsd.eval.run import EvalConfig
    from opsd.eval.run import main as eval_main
    from opsd.rollout.run import RolloutConfig, load_rollouts, prefill_arg
    from opsd.rollout.run import main as rollout_main
    from opsd.train.config import TrainConfig
    from opsd.train.run import main as train_main

    t0 = time.time()
    out = Path(args.out)
    for sub in ("rollouts", "critiques", "report"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    try:
        critic = build_critic(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    crit = critique_fn(critic, concurrency=args.critic_concurrency)
    prefill = prefill_arg(args.prefill)
    rcfg = RolloutConfig(tasks=args.train_tasks, out=str(out / "rollouts" / "train.jsonl"), model=args.model,
                         samples=args.samples, temperature=args.temperature, limit=args.train_limit,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, prefill=prefill,
                         device=args.device)
    prefill = rcfg.resolved_prefill()
    rcfg.out = str(out / "rollouts" / f"train-{rcfg.hash()}.jsonl")  # one file per rollout config: train reads it whole

    print(f"[demo 1/5] rollouts of {args.model} on {args.train_tasks} (limit {args.train_limit})", flush=True)
    print(f"  {rollout_main(rcfg)}", flush=True)
    trajs = load_rollouts(rcfg)

    print(f"[demo 2/5] critiques ({args.critic}) of {len(trajs)} rollouts", flush=True)
    crit_path = out / "critiques" / "train.jsonl"
    critiques = crit(trajs, crit_path)
    n_err = sum(c.verdict == "error" for c in critiques)
    print(f"  {n_err} errors to learn from", flush=True)
    if n_err == 0:
        print("no errors found: nothing to train on", file=sys.stderr)
        return 1

    print(f"[demo 3/5] OPSD training ({args.teacher} hinted teacher, error spans only)", flush=True)
    # only the trajectories of this critic's run: the critique file may hold other critics' lines
    tcfg = TrainConfig(model=args.model, trajectories=rcfg.out, critiques=str(crit_path), out=str(out), span=args.span,
                  loss=args.loss, beta=args.beta, lr=args.lr, epochs=args.epochs, batch_size=args.train_batch_size,
                  lora_r=args.lora_r, min_hint_effect=args.min_hint_effect, resume=True, teacher=args.teacher,
                  precompute_targets=args.teacher == "initial" and args.lora_r == 0, cpu=args.device == "cpu", warmup_steps=2)
    try:
        model_dir = train_main(tcfg)
    except RuntimeError as e:
        print(f"error: training failed: {e}", file=sys.stderr)
        return 1

    print(f"[demo 4/5] evaluation on held-out {args.eval_tasks} (limit {args.eval_limit})", flush=True)
    ecfg = EvalConfig(before=args.model, after=str(model_dir), tasks=args.eval_tasks, out=str(out / "report"),
                      limit=args.eval_limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      prefill=prefill, span=args.span, train_run=str(out), device=args.device)
    report = eval_main(ecfg, crit)

    print(f"[demo 5/5] before/after ({time.time() - t0:.0f} s in all; report: {out / 'report' / 'report.md'})\n")
    print(summary_table(report))
    return 0
