"""Cost curves: step time and peak RSS of opsd and TRL's trainers as the work grows (one axis at a time).

    flock /tmp/opsd-torch.lock python bench/curves.py --axis seq --json bench/results/curves.json     # ~12 min
    flock /tmp/opsd-torch.lock python bench/curves.py --axis vocab --json bench/results/curves.json   # ~10 min
    flock /tmp/opsd-torch.lock python bench/curves.py --axis span --json bench/results/curves.json    # ~8 min
    python bench/curves.py --plot-only --json bench/results/curves.json    # bench/results/curves_*.png

Each point runs `bench/step.py --side S` in its own process (1 warm-up step, then the median of the
timed steps; peak RSS of that process), at the precision used (bf16 where the CPU has it), batch 1:

- `seq`: trajectory length 512 -> 4096 tokens (span 32), the embedded SmolLM2-135M (vocabulary 49,152);
- `vocab`: 49,152 -> 151,936 (Qwen's size) on random-initialised models of SmolLM2's shape (1024 tokens,
  span 32); only the vocabulary differs, so the embedding / lm_head matrix grows from 28M to 88M weights;
- `span`: error span 8 -> 256 tokens at the end of a 1024-token trajectory (SmolLM2-135M).

Results are merged into `--json` by axis, so the axes can run in separate lock sessions. A GKDTrainer
point whose full-vocabulary logits would not fit (its loss holds about 16 (T x V) fp32 tensors) is
skipped and marked, not run into the out-of-memory killer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.timing import child_json_path, run_child

AXES = {"seq": [512, 1024, 2048, 4096], "vocab": [49152, 98304, 151936], "span": [8, 32, 128, 256]}
BASE = {"seq_len": 1024, "span": 32, "vocab": 49152, "batch": 1, "hint": 20}
SIDES = ("opsd", "distill", "gkd")
GKD_TENSORS = 16  # full-vocabulary (T x V) fp32 tensors alive in GKDTrainer's loss (FINDINGS: ~15 besides the logits)


def random_model(vocab: int, root: Path) -> str:
    """A random-initialised model of SmolLM2-135M's shape with `vocab` entries, saved with SmolLM2's tokenizer
    (the benchmark's ids are real SmolLM2 ids, all below 49,152)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from opsd.io import models

    d = root / f"smollm2-shape-v{vocab}"
    if (d / "config.json").exists():
        return str(d)
    cfg = AutoConfig.from_pretrained(models.default_model_dir())
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg)
    lm.save_pretrained(d)
    models.load_tokenizer("smollm2-135m-instruct").save_pretrained(d)
    return str(d)


def free_gb() -> float:
    with open("/proc/meminfo", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def point(side: str, model: str, precision: str, p: dict, steps: int) -> dict:
    path = child_json_path()
    cmd = [sys.executable, str(ROOT / "bench" / "step.py"), "--side", side, "--precision", precision, "--out-json", path,
           "--model", model, "--batch", str(p["batch"]), "--seq-len", str(p["seq_len"]), "--span", str(p["span"]),
           "--hint", str(p["hint"]), "--steps", str(steps), "--warmup", "1", "--lr", "1e-5", "--matmul-reps", "1"]
    try:
        res, meta = run_child(cmd, cwd=ROOT, out_json=path)
    except RuntimeError as e:
        return {"error": str(e)[-600:]}
    return {"step_s": statistics.median(res["times"]), "times": res["times"], "peak_rss_gb": res["peak_rss_gb"],
            "rss_after_load_gb": res["rss_after_load_gb"], "round": meta}


def run_axis(axis: str, precision: str, steps: int, model_root: Path, log=print) -> list[dict]:
    rows = []
    for x in AXES[axis]:
        p = dict(BASE, **({"seq_len": x} if axis == "seq" else {"span": x} if axis == "span" else {"vocab": x}))
        model = random_model(x, model_root) if axis == "vocab" else "smollm2-135m-instruct"
        row = {"x": x, **p, "sides": {}}
        for side in SIDES:
            need = GKD_TENSORS * p["batch"] * p["seq_len"] * p["vocab"] * 4 / 2**30
            if side == "gkd" and need > 0.6 * free_gb():
                row["sides"][side] = {"skipped": f"predicted {need:.0f} GB of logits > 60% of free memory"}
                continue
            row["sides"][side] = r = point(side, model, precision, p, steps)
            log(f"  {axis}={x:6d} {side:8s} " + (f"step {r['step_s']:6.2f} s  peak RSS {r['peak_rss_gb']:5.2f} GB  "
                                                 f"others' CPU {r['round']['others_cpu'] or 0:.0%}"
                                                 if "step_s" in r else r["error"][-200:]))
        rows.append(row)
    return rows


def plot(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"opsd": "opsd", "distill": "TRL DistillationTrainer", "gkd": "TRL GKDTrainer"}
    xlabel = {"seq": "trajectory length (tokens)", "vocab": "vocabulary size", "span": "error span (tokens)"}
    written = []
    for axis, rows in result.get("axes", {}).items():
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.6))
        for side in SIDES:
            pts = [(r["x"], r["sides"][side]) for r in rows if "step_s" in r["sides"].get(side, {})]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ax_t.plot(xs, [v["step_s"] for _, v in pts], marker="o", label=labels[side])
            ax_m.plot(xs, [v["peak_rss_gb"] for _, v in pts], marker="o", label=labels[side])
            skipped = [r["x"] for r in rows if "skipped" in r["sides"].get(side, {})]
            for x in skipped:
                ax_m.annotate(f"{labels[side]}: skipped\n(logits > memory)", (x, 0), fontsize=7, ha="center")
        for ax, yl in ((ax_t, "step time (s)"), (ax_m, "peak RSS (GB)")):
            ax.set_xlabel(xlabel[axis])
            ax.set_ylabel(yl)
            ax.set_xscale("log", base=2)
            ax.set_xticks([r["x"] for r in rows], [str(r["x"]) for r in rows])
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"one training step, batch 1, {result.get('precision', '')} (bench/curves.py --axis {axis})", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"curves_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--axis", choices=sorted(AXES), action="append", help="axis to run (repeatable; default: all)")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (auto: bf16 where the CPU has it)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per point (after 1 warm-up step)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "curves.json"))
    p.add_argument("--plot-only", action="store_true", help="only redraw the PNGs from --json")
    p.add_argument("--quick", action="store_true", help="smoke sizes: two small points per axis, not a measurement")
    a = p.parse_args(argv)
    path = Path(a.json)
    result = json.loads(path.read_text()) if path.exists() else {}
    if not a.plot_only:
        from opsd.io.models import resolve_precision

        precision = resolve_precision(a.precision, "cpu")
        if a.quick:
            AXES.update(seq=[64, 128], vocab=[49152, 65536], span=[4, 8])
            BASE.update(seq_len=128, span=8, hint=6)
        result |= {"precision": precision, "base": BASE, "quick": a.quick}
        result.setdefault("axes", {})
        with tempfile.TemporaryDirectory(prefix="opsd-curves-") as d:
            for axis in a.axis or list(AXES):
                print(f"cost curve: {axis} {AXES[axis]} at {precision}", flush=True)
                result["axes"][axis] = run_axis(axis, precision, a.steps, Path(d))
                path.write_text(json.dumps(result, indent=2))
    result["plots"] = plot(result, path.parent)
    path.write_text(json.dumps(result, indent=2))
    print("plots: " + ", ".join(result["plots"]))
    return result


if __name__ == "__main__":
    main()
