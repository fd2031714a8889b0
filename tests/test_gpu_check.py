"""scripts/gpu_check.sh is ready to run on a GPU: its dry run passes on CPU (every piece at its smallest), it refuses
to pretend without CUDA, and it prints one line per figure from the pieces' results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
SAVED = ROOT / "bench" / "results" / "avx512_bf16"


def test_figure_lines_from_the_pieces_results(tmp_path):
    step = json.loads((SAVED / "step.json").read_text())
    step["config"]["precisions"] = ["bf16"]
    lines = gpu_check.step_lines("smollm2-135m-instruct", step)
    b = step["by_precision"]["bf16"]
    assert lines[0].startswith(f"step smollm2-135m-instruct bf16, opsd = {b['sides']['opsd']['worst_round_step_s']:.3f} s")
    assert f"opsd / DistillationTrainer trajectories/s = {b['ratio_trajectories_per_s']:.2f}x" in lines[2]
    assert all(" = " in x for x in lines) and len(lines) == len(set(lines)) == 6
    del step["by_precision"]["bf16"]["sides"]["distill"]
    assert "DistillationTrainer = not run (trl is not installed" in gpu_check.step_lines("m", step)[1]
    roll = gpu_check.rollout_lines(json.loads((SAVED / "rollout.json").read_text()))
    assert roll[0].startswith("rollout smollm2-135m-instruct bf16, opsd rollout = ") and len(roll) == 4
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="9">'
                   "</testsuite></testsuites>")
    assert gpu_check.junit_counts(xml) == {"total": 9, "failed": 2, "skipped": 2, "passed": 5}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_fails_instead_of_measuring_the_cpu():
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check: FAILED (torch ")


@pytest.mark.slow
def test_dry_run_runs_every_piece_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHON=sys.executable))
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines[-1] == "gpu_check: ok", proc.stdout[-4000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] and not res["failed"]
    assert list(res["pieces"]) == ["tests", "step_embedded", "step_qwen_shape", "rollout"]
    assert all(p["rc"] == 0 for p in res["pieces"].values())
    n = res["pieces"]["tests"]["counts"]
    assert n["total"] >= 6 and n["passed"] == n["total"]  # the cuda tests ran (on CPU), none skipped
    qwen = res["pieces"]["step_qwen_shape"]["result"]
    assert qwen["matmul"]["fp32"]["sizes"]["vocab"] == 151936  # Qwen's vocabulary, at plumbing size otherwise
    assert res["pieces"]["rollout"]["result"]["config"]["model"] == "smollm2-135m-instruct"  # the embedded model
    figures = [x for x in lines if x.startswith("gpu_check ") and " = " in x]
    assert any(x.startswith("gpu_check cuda tests passed = ") for x in figures)
    assert sum(x.startswith("gpu_check step ") for x in figures) >= 8
    assert sum(x.startswith("gpu_check rollout ") for x in figures) >= 3
