"""`opsd split`: trajectories that share their first user turn stay on one side; the same seed, the same split."""
import json

import pytest

from opsd.split import SplitConfig, first_user_turn, main, split_groups
from opsd.types import Trajectory


def _traj(i: int, user: str) -> Trajectory:
    return Trajectory(f"t{i}", [{"role": "system", "content": f"agent {i % 3}"}, {"role": "user", "content": user},
                                {"role": "assistant", "content": f"reply {i}"}], [], {})


def _logs(n_requests: int = 12) -> list[Trajectory]:
    out, i = [], 0
    for r in range(n_requests):
        for _ in range(1 + r % 3):  # 1 to 3 trajectories per request (samples, retries)
            out.append(_traj(i, f"request {r}" + ("  " if i % 2 else "")))  # whitespace differences: same request
            i += 1
    return out


def test_same_first_user_turn_never_crosses_the_split():
    assert first_user_turn(_traj(0, "find  flights\n")) == first_user_turn(_traj(1, "find flights"))
    assert first_user_turn(_traj(0, "find flights")) != first_user_turn(_traj(0, "find hotels"))
    trajs = _logs()
    for seed in range(20):
        train, held = split_groups(trajs, 0.3, seed)
        assert len(train) + len(held) == len(trajs) and held and train
        assert not {first_user_turn(t) for t in train} & {first_user_turn(t) for t in held}
        assert len(held) >= 0.3 * len(trajs)
        assert [t.id for t in train] == [t.id for t in trajs if t in train]  # input order kept


def test_the_seed_decides_the_split():
    trajs = _logs()
    ids = {seed: [t.id for t in split_groups(trajs, 0.3, seed)[1]] for seed in range(5)}
    assert ids[0] == [t.id for t in split_groups(trajs, 0.3, 0)[1]]
    assert len(set(map(tuple, ids.values()))) > 1


def test_one_request_only_cannot_be_split(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no trajectory in .*empty.jsonl: nothing to split"):
        main(SplitConfig(logs=[str(tmp_path / "empty.jsonl")], out=str(tmp_path / "s")))
    with pytest.raises(ValueError, match="share one first user turn"):
        split_groups([_traj(i, "same") for i in range(4)], 0.3, 0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        SplitConfig(logs=["x"], heldout_fraction=1.0)


def test_cli_writes_both_sides_from_several_inputs(tmp_path):
    from opsd.cli import main as cli

    trajs = _logs()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in trajs[:10]))
    b.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in trajs[10:]))
    assert cli(["split", "--logs", str(a), str(b), "--out", str(tmp_path / "s"), "--seed", "3"]) == 0
    train = [json.loads(x)["id"] for x in (tmp_path / "s" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x)["id"] for x in (tmp_path / "s" / "heldout.jsonl").read_text().splitlines()]
    assert sorted(train + held) == sorted(t.id for t in trajs)
    summary = json.loads((tmp_path / "s" / "split.json").read_text())
    assert summary["shared_groups"] == 0 and summary["heldout_ids"] == held
    assert summary == main(SplitConfig(logs=[str(a), str(b)], out=str(tmp_path / "s"), seed=3))
