"""`opsd hint --ceiling`: the hinted teacher decodes with each hint in view, paired with the student (tiny model)."""
from __future__ import annotations

import asyncio
import json

from opsd_critic import make_critic
from opsd.hint.config import HintConfig
from opsd.hint.run import main as hint_main
from opsd.types import Trajectory
from tests.conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "bfcl_rollouts.jsonl"


def test_hint_ceiling_decodes_every_erroneous_reply(tiny_dir, tmp_path):
    trajs = [Trajectory.from_dict(json.loads(line)) for line in FIXTURE.open()][:4]
    critic = make_critic("schema+reference")
    crits = [asyncio.run(critic.critique(t)) for t in trajs]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(t.to_dict()) + "\n" for t in trajs))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(c.to_dict()) + "\n" for c in crits))
    out = tmp_path / "hints"
    hint_main(HintConfig(trajectories=[str(tmp_path / "t.jsonl")], critiques=[str(tmp_path / "c.jsonl")], out=str(out),
                         model=str(tiny_dir), precision="fp32", ceiling=True, max_new_tokens=4, progress=False))
    errors = sum(c.verdict == "error" for c in crits)
    rep = json.loads((out / "ceiling" / "ceiling.json").read_text())
    assert errors >= 2 and rep["n_hinted"] == errors and rep["n_tasks"] == 4
    hinted = [json.loads(x) for x in (out / "ceiling" / "rollouts.jsonl").read_text().splitlines()]
    assert len(hinted) == errors and all(h["messages"][-2]["role"] == "user" for h in hinted)
    assert all("Hint for your next reply" in h["messages"][-2]["content"] for h in hinted)
    assert "hinted teacher, decoding" in (out / "hint_effects.md").read_text()
