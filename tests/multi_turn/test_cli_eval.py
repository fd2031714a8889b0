"""`opsd eval` on multi-turn tasks runs episodes in BFCL's simulated environments and scores them with BFCL's
official multi-turn checker (opsd.eval.multi_turn), from a `bfcl:multi_turn_*` spec or a task file of them."""
from __future__ import annotations

import json

import pytest

from opsd.cli import main
from opsd.io.tasks import load_tasks


@pytest.mark.slow
def test_opsd_eval_dispatches_multi_turn_task_files(tmp_path, tiny_dir, capsys):
    task = load_tasks("bfcl:multi_turn_base:heldout", limit=1)[0]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": task.id, "messages": task.messages, "tools": task.tools, "meta": task.meta}) + "\n")
    out = tmp_path / "report"
    rc = main(["eval", "--before", str(tiny_dir), "--after", str(tiny_dir), "--tasks", str(tasks), "--limit", "1",
               "--max-new-tokens", "4", "--out", str(out), "--precision", "fp32", "--bootstrap", "100"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_tasks"] == report["n_paired"] == 1  # the multi-turn report, not the single-turn one
    assert report["per_task"][0]["task_id"] == task.id
    assert isinstance(report["per_task"][0]["before"]["valid"], bool)  # BFCL's official multi-turn checker's verdict
    assert (out / "report.md").exists() and "report:" in capsys.readouterr().out
