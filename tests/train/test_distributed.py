"""`accelerate launch --num_processes 2 --cpu` (gloo DDP) equals one process with the doubled batch; FSDP, which
accelerate cannot run on CPU, is refused with the reason instead of silently running something else."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CRITIQUES, TRAJECTORIES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(n: int, model_dir, out, batch_size: int, extra=(), *, dist=None, check=True):
    # accelerate's --cpu flag uses its single-process launcher (multi-CPU there needs mpirun); --multi_gpu
    # starts torchrun, and on a machine without CUDA accelerate then runs DDP on CPU over gloo
    dist = dist if dist is not None else (["--multi_gpu", "--main_process_port", "29517"] if n > 1 else ["--cpu"])
    args = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *dist,
            "-m", "opsd.train", "--cpu", "--precision", "fp32",
            "--model", str(model_dir), "--trajectories", str(TRAJECTORIES), "--critiques", str(CRITIQUES),
            "--out", str(out), "--batch-size", str(batch_size), "--max-steps", "3", "--lr", "1e-3", "--seed", "3",
            "--min-hint-effect=-inf", "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT}
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if not check:
        return r
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"world={n}" in r.stderr, r.stderr[-3000:]  # really n processes, not n copies of one
    return out


@pytest.mark.timeout(400)
def test_two_processes_equal_one_with_doubled_batch(tiny_dir, tmp_path):
    one = launch(1, tiny_dir, tmp_path / "one", 4)
    two = launch(2, tiny_dir, tmp_path / "two", 2)
    w1, w2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    start = load_file(tiny_dir / "model.safetensors")
    moved = max((w1[k] - start[k]).abs().max().item() for k in w1)
    assert moved > 1e-3  # training did change the weights
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)
    m1 = (one / "metrics.jsonl").read_text().splitlines()
    m2 = (two / "metrics.jsonl").read_text().splitlines()
    assert len(m1) == len(m2) == 4  # data counts + 3 steps, written once (main process)


@pytest.mark.timeout(300)
def test_fsdp_on_cpu_is_refused_with_the_reason(tiny_dir, tmp_path):
    """accelerate 1.15 on CPU: `--use_fsdp` with the script's --cpu gives DDP over gloo (MULTI_CPU), without it a
    world of 1 per process; either way not FSDP. opsd refuses to train as if it were, naming the working route."""
    r = launch(2, tiny_dir, tmp_path / "fsdp", 2, check=False,
               dist=["--use_fsdp", "--fsdp_sync_module_states", "false", "--main_process_port", "29518"])
    assert r.returncode != 0
    assert "accelerate was launched with FSDP but runs MULTI_CPU" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "fsdp" / "model").exists()
