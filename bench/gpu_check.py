"""The GPU check (issue 25): on one CUDA GPU, in under 8 minutes, with no hub access, one result line per figure.

    scripts/gpu_check.sh                       # = python bench/gpu_check.py; on a machine with one CUDA GPU
    scripts/gpu_check.sh --dry-run             # on CPU: every piece runs its smallest CPU version (make test runs it)
    scripts/gpu_check.sh --json /tmp/gpu.json  # all the figures, for BENCHMARKS.md (with the GPU's name)

Pieces, each in its own process, in this order, each with a time limit:

1. `tests`: the tests marked `cuda` (tests/test_cuda.py): bf16 on the GPU, and the loss, span-scoring and
   teacher-reuse equalities there (against the CPU or the whole-sequence reference).
2. `step_embedded`: one OPSD step against TRL's `DistillationTrainer` at bf16 (bench/step.py --device cuda,
   sides opsd and distill, 1 round), on the embedded SmolLM2-135M, batch 4 x 512 tokens, span 32.
3. `step_qwen_shape`: the same on a random-initialised model of Qwen2.5-1.5B's shape (QWEN_SHAPE, built
   from a transformers `Qwen2Config` on the GPU and saved with SmolLM2's tokenizer: nothing is downloaded).
4. `rollout`: `opsd rollout` against naive batch-8 `generate` on 64 held-out BFCL tasks, embedded model, bf16.

`--dry-run` runs the same pieces on CPU at their smallest: the cuda tests on CPU (OPSD_TEST_DEVICE=cpu), the
steps on tiny models of the same two architectures (`--quick` sizes, fp32), 2 rollouts of 4 tokens. The
Python that runs it needs opsd's dependencies and a CUDA build of torch; the embedded model's first load
converts its GGUF (about 20 s) into the opsd cache. The last line is `gpu_check: ok` or `gpu_check: FAILED (...)`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LIMIT_S = 8 * 60  # the whole check, on the GPU
# Qwen2.5-1.5B's sizes (its config.json); 1.54B parameters with the tied embedding
QWEN_SHAPE = {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
              "intermediate_size": 8960, "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1e6,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128}  # --dry-run: the same architectures at plumbing size


def shaped_model(root: Path, name: str, base: str, sizes: dict, *, device: str, embedded: str) -> str:
    """A random-initialised causal LM saved under root/name: the architecture of `base` ("qwen2": a Qwen2Config;
    else the embedded model's config) with `sizes` changed, and the embedded model's (SmolLM2's) tokenizer: its ids
    fit every vocabulary here. Built on `device` (a 1.5B model initialises in seconds on a GPU), saved in bf16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    from opsd.io import models

    out = root / name
    tok = models.load_tokenizer(embedded)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    cfg = Qwen2Config(**(QWEN_SHAPE | sizes | ids)) if base == "qwen2" else \
        AutoConfig.from_pretrained(models.resolve(embedded), **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    del lm
    if device == "cuda":
        torch.cuda.empty_cache()  # the pieces run in processes of their own: leave them the GPU's memory
    return str(out)


def run_piece(name: str, cmd: list[str], *, timeout: float | None, env: dict | None = None) -> dict:
    """Run one piece; returns its rc, wall time and output tail (rc 124 when it ran past `timeout`, or had no time
    left at all)."""
    print(f"[gpu_check] {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    if timeout is not None and timeout <= 0:
        print(f"[gpu_check] {name}: not run, the time limit was spent", flush=True)
        return {"name": name, "rc": 124, "wall_s": 0.0, "tail": "not run: the time limit was spent"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=(os.environ | env) if env else None)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = 124, f"timed out after {timeout:.0f} s\n" + (e.stdout or b"").decode(errors="replace")[-2000:] \
            if isinstance(e.stdout, bytes) else f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"[gpu_check] {name} failed (rc {rc}):\n{tail}", flush=True)
    return {"name": name, "rc": rc, "wall_s": wall, "tail": tail}


def junit_counts(path: Path) -> dict:
    """passed / failed / skipped / total of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = n["failures"] + n["errors"]
    return {"total": n["tests"], "failed": failed, "skipped": n["skipped"], "passed": n["tests"] - failed - n["skipped"]}


def step_lines(label: str, res: dict) -> list[str]:
    """One line per figure of a bench/step.py result (sides opsd and distill, one precision)."""
    pr = res["config"]["precisions"][0]
    b = res["by_precision"][pr]
    o, d = b["sides"]["opsd"], b["sides"].get("distill")
    lines = [f"step {label} {pr}, opsd = {o['worst_round_step_s']:.3f} s per step ({o['trajectories_per_s']:.2f} "
             "trajectories/s)"]
    if d is None:
        lines.append(f"step {label} {pr}, DistillationTrainer = not run (trl is not installed: pip install -e '.[bench]')")
    else:
        lines += [f"step {label} {pr}, DistillationTrainer = {d['worst_round_step_s']:.3f} s per step "
                  f"({d['trajectories_per_s']:.2f} trajectories/s)",
                  f"step {label} {pr}, opsd / DistillationTrainer trajectories/s = {b['ratio_trajectories_per_s']:.2f}x"]
    for side, v in (("opsd", o), ("DistillationTrainer", d or {})):
        if not v:
            continue
        mem = f"{v['peak_gpu_gb']:.2f} GB GPU" if v.get("peak_gpu_gb") else f"{v['peak_rss_gb']:.2f} GB RSS"
        lines.append(f"step {label} {pr}, {side} peak memory = {mem}")
    mm = res["matmul"][pr]
    lines.append(f"step {label} {pr}, matmul on the model's GEMM shapes = {mm['model_gemm_gflops']:.0f} GFLOP/s "
                 f"({res['n_params'] / 1e6:.0f}M parameters); opsd at {o['floor_share']:.0%} of that FLOP floor")
    return lines


def rollout_lines(res: dict) -> list[str]:
    c, s = res["config"], res["sides"]
    o, n = s["opsd"], s["naive"]
    tag = f"rollout {Path(c['model']).name} {c['precision']}"
    lines = [f"{tag}, opsd rollout = {o['items_per_s']:.2f} replies/s ({c['limit']} tasks, {o['generated_tokens']} "
             "generated tokens, model load included)",
             f"{tag}, naive batch-{c['naive_batch']} generate = {n['items_per_s']:.2f} replies/s",
             f"{tag}, opsd rollout / naive generate = {res['rollout_speedup']:.2f}x"]
    if o.get("decode"):
        lines.append(f"{tag}, opsd decode = {o['decode']['generated_tokens_per_s']:.0f} generated tokens/s")
    return lines


def pieces(dry: bool, out: Path) -> list[tuple[str, list[str], dict | None]]:
    """(name, command, extra env) of every piece; EMBEDDED, STEP_SMALL and QWEN stand for the models' paths (the
    embedded model, the smaller step's model: the embedded one, or a tiny stand-in in the dry run, and Qwen's shape)."""
    py = sys.executable
    dev = "cpu" if dry else "cuda"
    tests = [py, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider",
             f"--junitxml={out / 'cuda_tests.xml'}"]
    # the dry run leaves TRL's side out where trl is missing (it is the `bench` extra); on the GPU it must be there
    sides = "opsd,distill" if not dry or importlib.util.find_spec("trl") else "opsd"
    step = [py, "bench/step.py", "--device", dev, "--sides", sides, "--rounds", "1", "--no-precomputed",
            "--reruns", "0"] + (["--quick", "--precisions", "fp32"] if dry else
                                ["--precisions", "bf16", "--steps", "5", "--trl-steps", "3", "--warmup", "2"])
    rollout = [py, "bench/rollout.py", "--model", "EMBEDDED", "--device", dev, "--rounds", "1", "--no-fp32",
               "--reruns", "0", "--json", str(out / "rollout.json")] + (["--precision", "fp32", "--limit", "2", "--max-new-tokens", "4"]
                                                       if dry else ["--precision", "bf16"])
    return [("tests", tests, {"OPSD_TEST_DEVICE": dev}),
            ("step_embedded", step + ["--model", "STEP_SMALL", "--json", str(out / "step_embedded.json")], None),
            ("step_qwen_shape", step + ["--model", "QWEN", "--json", str(out / "step_qwen_shape.json")], None),
            ("rollout", rollout, None)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on CPU, every piece at its smallest (no GPU needed)")
    p.add_argument("--json", help="write every result here")
    p.add_argument("--embedded", default="smollm2-135m-instruct",
                   help="the embedded model, or a local dir of it (e.g. one converted elsewhere and carried along)")
    p.add_argument("--limit-s", type=float, help=f"time limit of the whole check, seconds (default: {LIMIT_S} on the GPU; "
                                                 "none in the dry run, whose speed is the CPU's)")
    a = p.parse_args(argv)
    limit = a.limit_s or (None if a.dry_run else LIMIT_S)
    import torch

    t_start = time.perf_counter()
    if not a.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: FAILED (torch {torch.__version__} in {sys.executable} sees no CUDA GPU; "
              "`--dry-run` checks the pieces on CPU)", flush=True)
        return 2
    name = "cpu (dry run)" if a.dry_run else torch.cuda.get_device_name()
    lines = [f"device = {name}; torch {torch.__version__}, CUDA {torch.version.cuda}, {sys.executable}"]
    print(f"gpu_check {lines[0]}", flush=True)
    results: dict = {"device": name, "dry_run": a.dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
                     "pieces": {}}
    with tempfile.TemporaryDirectory(prefix="opsd-gpu-check-") as d:
        out, mdir = Path(d), Path(d) / "models"
        dev = "cpu" if a.dry_run else "cuda"
        t0 = time.perf_counter()
        paths = {"EMBEDDED": a.embedded,
                 "STEP_SMALL": shaped_model(mdir, "smollm2-shape-tiny", "smollm2", TINY, device=dev,
                                            embedded=a.embedded) if a.dry_run
                 else a.embedded,
                 "QWEN": shaped_model(mdir, "qwen2.5-1.5b-shape" + ("-tiny" if a.dry_run else ""), "qwen2",
                                      TINY if a.dry_run else {}, device=dev, embedded=a.embedded)}
        lines.append(f"random Qwen2.5-1.5B-shaped model built and saved = {time.perf_counter() - t0:.1f} s")
        print(f"gpu_check {lines[-1]}", flush=True)
        failed = []
        labels = {"step_embedded": Path(paths["STEP_SMALL"]).name, "step_qwen_shape": Path(paths["QWEN"]).name}
        for piece, cmd, env in pieces(a.dry_run, out):
            cmd = [paths.get(x, x) for x in cmd]
            left = None if limit is None else limit - (time.perf_counter() - t_start)
            r = run_piece(piece, cmd, timeout=left, env=env)
            results["pieces"][piece] = r
            if r["rc"] != 0:
                failed.append(piece)
            new = piece_lines(piece, r, out, labels.get(piece, ""))
            for line in new:
                print(f"gpu_check {line}", flush=True)
            lines += new
    total = time.perf_counter() - t_start
    lines.append(f"total wall time = {total:.0f} s" + (f" (limit {limit:.0f} s)" if limit else ""))
    print(f"gpu_check {lines[-1]}", flush=True)
    results |= {"lines": lines, "total_s": total, "failed": failed}
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    if limit and total > limit:
        failed.append("time")
    print("gpu_check: ok" if not failed else f"gpu_check: FAILED ({', '.join(failed)})", flush=True)
    return 0 if not failed else 1


def piece_lines(piece: str, r: dict, out: Path, label: str = "") -> list[str]:
    """The result lines of one finished piece (its figures, read from its JSON / junit output), and keep them in r."""
    lines = []
    if piece == "tests" and (out / "cuda_tests.xml").exists():
        n = junit_counts(out / "cuda_tests.xml")
        r["counts"] = n
        lines.append(f"cuda tests passed = {n['passed']}/{n['total']} ({n['failed']} failed, {n['skipped']} skipped; "
                     f"{r['wall_s']:.0f} s)")
    elif piece.startswith("step") and (out / f"{piece}.json").exists():
        res = json.loads((out / f"{piece}.json").read_text())
        r["result"] = res
        lines += step_lines(label or piece, res)
    elif piece == "rollout" and (out / "rollout.json").exists():
        res = json.loads((out / "rollout.json").read_text())
        r["result"] = res
        lines += rollout_lines(res)
    lines.append(f"{piece} wall time = {r['wall_s']:.0f} s" + ("" if r["rc"] == 0 else f" (FAILED, rc {r['rc']})"))
    return lines


if __name__ == "__main__":
    sys.exit(main())
