"""`opsd hint` and `opsd train` read several log and critique files and skip bad records with --rejects."""
from __future__ import annotations

import json

from tests.conftest import CRITIQUES, TRAJECTORIES


def split_inputs(tmp_path):
    """sample_openai over two files (the second with a broken line) and its critiques over two files."""
    lines = TRAJECTORIES.read_text().splitlines(keepends=True)
    crits = CRITIQUES.read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:3]))
    (tmp_path / "b.jsonl").write_text("".join(lines[3:]) + '{"id": "broken", "messages": "nope"}\n')
    (tmp_path / "ca.jsonl").write_text("".join(crits[:4]))
    (tmp_path / "cb.jsonl").write_text("".join(crits[4:]))
    return [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "ca.jsonl", "cb.jsonl")]


def test_hint_takes_several_inputs_and_rejects(tiny_model_dir, tmp_path, capsys):
    from opsd.cli import main

    a, b, ca, cb = split_inputs(tmp_path)
    rejects = tmp_path / "not_yet" / "rejects.jsonl"  # its folder does not exist yet
    rc = main(["hint", "--trajectories", a, b, "--critiques", ca, cb, "--rejects", str(rejects),
               "--model", str(tiny_model_dir), "--out", str(tmp_path / "hints"), "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rows = [json.loads(x) for x in (tmp_path / "hints" / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and "6 examples from 8 critiques" in cap.out
    assert [json.loads(x)["line"] for x in rejects.read_text().splitlines()] == [6]
    assert "hint effect" in cap.err and "6/6" in cap.err  # the progress bar, on stderr
