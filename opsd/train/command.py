"""`opsd train` as the CLI runs it: `opsd.train` plus, for GKD+RL (`--rl-alpha < 1`), a critic reward.

    opsd train --trajectories runs/r/rollouts.jsonl --out runs/gkd_rl --teacher external \\
        --teacher-model TEACHER_DIR --lmbda 1 --rl-alpha 0.5 --reward schema --gen-prefill '<tool_call>\\n'

The reward of a sampled reply (GKD+RL, Agarwal et al. 2024): 1 when the critic finds no error
and the reply holds a parseable tool call, else 0. `--reward schema`: a valid call of a declared
tool with valid arguments; `reference`: the call matches the task's `meta.ground_truth` (BFCL
semantics); `schema+reference`: both. This module is the only place that composes `opsd.train`
with `critic`.
"""
from __future__ import annotations

from opsd.critique.run import critic_reward  # noqa: F401  (moved to opsd.critique; imported here by callers)
from opsd.train.run import add_arguments  # noqa: F401  (add_arguments is this command's parser)
from opsd.train.run import run as _run


def run(args) -> int:
    from opsd.train.config import config_from_args

    cfg = config_from_args(args)
    reward_fn = None
    if cfg.rl_alpha < 1.0:
        from critic import CRITICS, make_critic

        if cfg.reward not in CRITICS or cfg.reward == "llm":
            print(f"opsd train: --reward must be one of {[c for c in CRITICS if c != 'llm']}, got {cfg.reward!r}")
            return 2
        reward_fn = critic_reward(make_critic(cfg.reward))
    return _run(args, reward_fn=reward_fn)
