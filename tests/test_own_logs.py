"""README "Your own logs, end to end" runs as written: its bash block is parsed out of README.md, so the test
and the README cannot drift apart (slow: the real embedded model, the README's tiny step counts)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import DATA, ROOT

SECTION = "## Your own logs, end to end"


def readme_commands() -> list[list[str]]:
    """The argv of every command in the section's bash block (continuation lines joined, comments dropped)."""
    text = (ROOT / "README.md").read_text("utf-8")
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            commands.append(argv)
    return commands


def test_the_section_is_opsd_commands_whose_flags_parse():
    """Cheap check (no model): every command is `opsd ...`, and its flags build that command's Config."""
    import importlib

    from opsd.cli import CONFIGS
    from opsd.config import parse

    commands = readme_commands()
    assert [c[1] for c in commands] == ["validate", "split", "critique", "critique", "hint", "train", "eval"]
    for argv in commands:
        assert argv[0] == "opsd"
        module, name = CONFIGS[argv[1]].split(":")
        parse(getattr(importlib.import_module(module), name), argv[2:], prog=f"opsd {argv[1]}")


@pytest.mark.slow
def test_the_readme_section_runs_as_written(tmp_path):
    (tmp_path / "data").symlink_to(DATA)  # the README's paths are relative to the repository root
    for argv in readme_commands():
        r = subprocess.run([sys.executable, "-m", "opsd.cli", *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    mine = tmp_path / "runs" / "mine"
    split = json.loads((mine / "split" / "split.json").read_text())
    assert split["shared_groups"] == 0 and split["heldout"]["trajectories"] > 0
    held_errors = sum(json.loads(x)["verdict"] == "error" for x in (mine / "critiques_heldout.jsonl").read_text().splitlines())
    rep = json.loads((mine / "report" / "report.json").read_text())
    assert rep["kind"] == "logs" and rep["teacher_forced"]["n_examples"] == held_errors > 0
    allc = rep["per_category"]["all"]
    assert allc["n"] == held_errors and allc["paired"]["ci95"] is not None and allc["paired"]["p"] is not None
    assert rep["drift"]["kl_critic_ok_replies"]["n"] > 0 and rep["drift"]["kl_outside_error_spans"]["n"] > 0
    assert (mine / "report" / "report.md").read_text().startswith("# opsd evaluation report: critiqued logs")
    assert rep["plots"] and all((mine / "report" / p).exists() for p in rep["plots"])
