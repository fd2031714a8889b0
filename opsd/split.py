"""`opsd split`: split a log set into train and held-out trajectories without leakage.

    opsd split --logs runs/mine/logs.jsonl data/more.jsonl.gz --heldout-fraction 0.3 --seed 0 --out runs/mine/split

Trajectories that share their first user turn (the same request, answered several times: samples of
one task, retries, near-copies of a log) form one group, and a group goes to one side whole, so a
held-out error is never the same request as a trained one. Groups are shuffled with `--seed` and
taken into held-out until it holds at least `--heldout-fraction` of the trajectories (both sides get
at least one group when there are two). The same inputs and seed give the same split.

Writes OUT/train.jsonl and OUT/heldout.jsonl (normalised, as `opsd validate --out` writes them) and
OUT/split.json (counts, the seed, and which group each trajectory id went with).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opsd.io.trajectories import write_trajectories
from opsd.logs import as_paths, read_logs
from opsd.types import Trajectory, content_hash


@dataclass
class SplitConfig:
    logs: list[str] = field(default_factory=list, metadata={
        "help": "trajectory logs, one or more (any format `opsd validate` reads)"})
    out: str = field(default="", metadata={"help": "output folder: train.jsonl, heldout.jsonl, split.json"})
    heldout_fraction: float = field(default=0.3, metadata={
        "help": "share of the trajectories held out (whole groups: the held-out share is at least this)"})
    seed: int = field(default=0, metadata={"help": "seed of the group shuffle (the same seed gives the same split)"})
    rejects: str | None = field(default=None, metadata={
        "help": "write invalid input records here, with the reason, and go on (None: stop at the first)"})

    def __post_init__(self) -> None:
        self.logs = as_paths(self.logs)
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction: must be in (0, 1), got {self.heldout_fraction}")


def first_user_turn(traj: Trajectory) -> str:
    """The group key: a hash of the first user message's content (of the whole conversation when it has none)."""
    user = next((m.get("content") for m in traj.messages if m.get("role") == "user"), None)
    if isinstance(user, str):
        user = " ".join(user.split())  # whitespace differences do not make a new request
    return content_hash(user if user is not None else traj.messages)


def split_groups(trajs: list[Trajectory], fraction: float, seed: int) -> tuple[list[Trajectory], list[Trajectory]]:
    """(train, held-out), each in input order; trajectories with the same `first_user_turn` on one side."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajs):
        groups.setdefault(first_user_turn(t), []).append(i)
    if len(groups) < 2:
        raise ValueError(f"logs: all {len(trajs)} trajectories share one first user turn, so no split keeps them "
                         "apart; add logs of other requests")
    order = list(groups)
    random.Random(seed).shuffle(order)
    target, held = fraction * len(trajs), set()
    for key in order:
        if len(held) >= target or len(held) + len(groups[key]) == len(trajs):
            break  # enough held out, or this group would leave train empty
        held.update(groups[key])
    return [t for i, t in enumerate(trajs) if i not in held], [t for i, t in enumerate(trajs) if i in held]


def main(cfg: SplitConfig) -> dict:
    """Split `cfg.logs` into OUT/train.jsonl and OUT/heldout.jsonl; returns the summary (also OUT/split.json)."""
    if not cfg.out:
        raise ValueError("out: give the output folder, e.g. --out runs/mine/split")
    trajs, _ = read_logs(cfg.logs, rejects=cfg.rejects, what="logs")
    if not trajs:
        raise ValueError(f"logs: no trajectory in {', '.join(cfg.logs)}: nothing to split")
    train, held = split_groups(trajs, cfg.heldout_fraction, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_trajectories(out / "train.jsonl", train)
    write_trajectories(out / "heldout.jsonl", held)
    keys = {first_user_turn(t) for t in held}
    summary = {"trajectories": len(trajs), "groups": len({first_user_turn(t) for t in trajs}),
               "train": {"trajectories": len(train), "groups": len({first_user_turn(t) for t in train}),
                         "file": str(out / "train.jsonl")},
               "heldout": {"trajectories": len(held), "groups": len(keys), "file": str(out / "heldout.jsonl")},
               "shared_groups": len(keys & {first_user_turn(t) for t in train}),  # 0 by construction
               "config": asdict(cfg),
               "heldout_ids": [t.id for t in held]}
    (out / "split.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def format_summary(s: dict) -> str:
    return (f"{s['trajectories']} trajectories in {s['groups']} groups (same first user turn): "
            f"train {s['train']['trajectories']} ({s['train']['groups']} groups) -> {s['train']['file']}, "
            f"held-out {s['heldout']['trajectories']} ({s['heldout']['groups']} groups) -> {s['heldout']['file']}")
