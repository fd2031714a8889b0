"""CPU smoke runs of the shipped accelerate configs (examples/accelerate/*.yaml): 2 processes over gloo.

Each config is launched exactly as the examples say, with only the process count (8 GPUs -> 2 CPU
processes), the port and mixed precision (bf16 -> no) overridden; opsd train runs 2 steps on a tiny
random Llama and must report world=2 and write a loadable model. A config whose file says it cannot
run on CPU (FSDP) is checked for exactly that: on CPU, accelerate does not shard with it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CRITIQUES, TRAJECTORIES

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "accelerate").glob("*.yaml"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_config_is_smoke_tested_or_says_why_not():
    assert {c.name for c in CONFIGS} >= {"ddp.yaml", "fsdp.yaml"}
    for c in CONFIGS:
        text = c.read_text()
        assert "CPU smoke run" in text or "cannot run on CPU" in text, f"{c}: say how it is tested on CPU"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("config", [c.name for c in CONFIGS])
def test_config_trains_with_two_processes_over_gloo(config, tiny_dir, tmp_path):
    if "cannot run on CPU" in (ROOT / "examples" / "accelerate" / config).read_text():
        pytest.skip(f"{config} says why it cannot run on CPU")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "examples" / "accelerate" / config),
            "--num_processes", "2", "--main_process_port", str(_port()), "--mixed_precision", "no",
            "-m", "opsd.cli", "train", "--cpu", "--model", str(tiny_dir), "--trajectories", str(TRAJECTORIES),
            "--critiques", str(CRITIQUES), "--out", str(out), "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3",
            "--min-hint-effect=-inf", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world=2" in r.stderr, r.stderr[-3000:]
    from opsd.io import models

    lm, _ = models.load(str(out / "model"), device="cpu")
    assert sum(p.numel() for p in lm.parameters()) > 0


PROBE = """
import sys
import torch
from accelerate import Accelerator
acc = Accelerator(cpu=sys.argv[1] == "cpu")
acc.prepare(torch.nn.Linear(4, 4))
print(f"rank={acc.process_index} type={acc.distributed_type.name}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", [c.name for c in CONFIGS if "cannot run on CPU" in c.read_text()])
def test_config_that_cannot_run_on_cpu_really_cannot(config, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kinds = set()
    for flag in ("cpu", "no-cpu"):
        args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "examples" / "accelerate" / config),
                "--num_processes", "2", "--main_process_port", str(_port()), "--mixed_precision", "no", str(probe), flag]
        r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        kinds |= {line.split("type=")[1] for line in r.stdout.splitlines() if "type=" in line}
    assert kinds and "FSDP" not in kinds and "DEEPSPEED" not in kinds, (
        f"{config} now shards on CPU ({kinds}): give it a real CPU smoke run and drop 'cannot run on CPU'")
