"""Cost curves: step time and peak RSS of opsd and TRL's trainers as the work grows (one axis at a time).

    flock /tmp/opsd-torch.lock python bench/curves.py --vocab-seq-len 512 --points span=8,32,256   # ~10 min on 2 cores
    flock /tmp/opsd-torch.lock python bench/curves.py --axis span --json bench/results/avx2/curves.json   # one axis
    python bench/curves.py --plot-only --json bench/results/avx2/curves.json    # bench/results/avx2/curves_*.png
    flock /tmp/opsd-torch.lock python bench/curves.py --quick --json /tmp/curves_quick.json   # smoke sizes, ~4 min

Each side at each point runs `bench/step.py --side S` in its own process (1 warm-up step, then the median
of `--steps` timed steps; peak RSS = `ru_maxrss` of that process, so it is the point's own, not a running
maximum), at the precision used (bf16 where the CPU has it) on every side, batch 1. A point during which
other processes used more than 10% of the CPU is run once more (bench/timing.py). Axes:

- `seq`: trajectory length 512 -> 4096 tokens (span 32), the embedded SmolLM2-135M (vocabulary 49,152);
- `vocab`: 49,152 -> 151,936 (Qwen's size) on random-initialised models of SmolLM2's shape (1024 tokens,
  or `--vocab-seq-len`, span 32); only the vocabulary differs, so the tied embedding / lm_head grows from
  28M to 88M weights;
- `span`: error span 8 -> 256 tokens at the end of a 1024-token trajectory (SmolLM2-135M).

The base point (1024 tokens, span 32) is on the `seq` and `span` axes; it is measured once per run. Results
are merged into `--json` by axis, so the axes can run in separate lock sessions. A GKDTrainer point whose
full-vocabulary logits are predicted not to fit (GKD_TENSORS) is skipped and marked, not run into the
out-of-memory killer. `shape()` summarises what each curve shows; bench/report_sections.py renders it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import cpu_kind, read_isa
from bench.timing import child_json_path, run_child

AXES = {"seq": [512, 1024, 2048, 4096], "vocab": [49152, 98304, 151936], "span": [8, 32, 128, 256]}
BASE = {"seq_len": 1024, "span": 32, "vocab": 49152, "batch": 1, "hint": 20}
SIDES = ("opsd", "distill", "gkd")
# full-vocabulary (T x V) fp32-sized tensors alive at GKDTrainer's peak: bench/step.py measured 11.7 GB peak RSS at
# bf16 for 4 x 512 tokens x 49,152 (0.40 GB per tensor) with ~2.7 GB of model state, i.e. ~22 such tensors
GKD_TENSORS = 24
GKD_MEMORY_SHARE = 0.8  # a GKD point runs only when its predicted logits fit in this share of MemAvailable


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


def point(side: str, model: str, precision: str, p: dict, steps: int, memo: dict | None = None) -> dict:
    """One side at one point, in its own process (so peak RSS is that point's, not a running max). A point
    already measured in this run (the base point is on the `seq` and `span` axes) is reused from `memo`."""
    key = (side, model, precision, p["batch"], p["seq_len"], p["span"], p["hint"], steps)
    if memo is not None and key in memo:
        return dict(memo[key], reused=True)
    path = child_json_path()
    cmd = [sys.executable, str(ROOT / "bench" / "step.py"), "--side", side, "--precision", precision, "--out-json", path,
           "--model", model, "--batch", str(p["batch"]), "--seq-len", str(p["seq_len"]), "--span", str(p["span"]),
           "--hint", str(p["hint"]), "--steps", str(steps), "--warmup", "1", "--lr", "1e-5", "--matmul-reps", "1"]
    discarded = []
    try:
        res, meta = run_child(cmd, cwd=ROOT, out_json=path)
        if meta["loaded"]:  # another process used > 10% of the CPU meanwhile: run the point once more, keep that
            discarded.append(meta | {"times": res["times"], "peak_rss_gb": res["peak_rss_gb"]})
            res, meta = run_child(cmd, cwd=ROOT, out_json=path)
    except RuntimeError as e:
        return {"error": str(e)[-600:]}
    out = {"step_s": statistics.median(res["times"]), "times": res["times"], "peak_rss_gb": res["peak_rss_gb"],
           "rss_after_load_gb": res["rss_after_load_gb"], "round": meta}
    if discarded:
        out["discarded"] = discarded
    if memo is not None:
        memo[key] = out
    return out


def run_axis(axis: str, precision: str, steps: int, model_root: Path, log=print, memo: dict | None = None,
             vocab_seq_len: int | None = None) -> list[dict]:
    rows = []
    for x in AXES[axis]:
        p = dict(BASE, **({"seq_len": x} if axis == "seq" else {"span": x} if axis == "span"
                          else {"vocab": x, "seq_len": vocab_seq_len or BASE["seq_len"]}))
        model = random_model(x, model_root) if axis == "vocab" else "smollm2-135m-instruct"
        row = {"x": x, **p, "sides": {}}
        for side in SIDES:
            need = GKD_TENSORS * p["batch"] * p["seq_len"] * p["vocab"] * 4 / 2**30
            if side == "gkd" and need > GKD_MEMORY_SHARE * free_gb():
                row["sides"][side] = {"skipped": f"skipped: predicted {need:.0f} GB of logits > "
                                                 f"{GKD_MEMORY_SHARE:.0%} of the {free_gb():.0f} GB available"}
                continue
            row["sides"][side] = r = point(side, model, precision, p, steps, memo)
            log(f"  {axis}={x:6d} {side:8s} " + (f"step {r['step_s']:6.2f} s  peak RSS {r['peak_rss_gb']:5.2f} GB  "
                                                 f"wall {r['round']['wall_s']:5.1f} s  others' CPU "
                                                 f"{r['round']['others_cpu'] or 0:.0%}" + ("  (reused)" if r.get("reused") else "")
                                                 if "step_s" in r else r["error"][-200:]), flush=True)
        rows.append(row)
    return rows


STATE_BYTES = {"opsd": 16, "distill": 20, "gkd": 20}  # per weight: fp32 weights, gradients, 2 AdamW moments; TRL: + fp32 teacher copy


def shape(result: dict) -> dict:
    """What each curve shows, per axis and side: growth of step time and peak RSS from the first to the last
    measured point, RSS per unit of the axis, how far the middle points lie from the straight line through the
    end points (share of the total growth), and on the vocabulary axis the part of the growth that is the
    larger model's own state (ΔV x hidden x STATE_BYTES[side]) and what remains beyond it (activations, logits)."""
    out: dict = {}
    unit = {"seq": 1024, "span": 128, "vocab": 10_000}
    for axis, rows in result.get("axes", {}).items():
        sides = {}
        for side in SIDES:
            pts = [(r["x"], r["sides"][side]) for r in rows if "step_s" in r["sides"].get(side, {})]
            if len(pts) < 2:
                continue
            (x0, a), (x1, z) = pts[0], pts[-1]
            grow = z["peak_rss_gb"] - a["peak_rss_gb"]
            dev = max((abs(v["peak_rss_gb"] - (a["peak_rss_gb"] + grow * (x - x0) / (x1 - x0))) for x, v in pts[1:-1]),
                      default=None)
            d = {"x": [x0, x1], "points": len(pts), "step_s": [a["step_s"], z["step_s"]], "step_ratio": z["step_s"] / a["step_s"],
                 "peak_rss_gb": [a["peak_rss_gb"], z["peak_rss_gb"]], "rss_growth_gb": grow,
                 "rss_gb_per_unit": grow / (x1 - x0) * unit[axis], "unit": unit[axis],
                 "step_s_per_unit": (z["step_s"] - a["step_s"]) / (x1 - x0) * unit[axis],
                 "rss_off_line_share": None if dev is None or abs(grow) < 0.05 else dev / abs(grow),
                 "rss_off_line_gb": dev}
            if axis == "vocab" and result.get("hidden"):
                state = (x1 - x0) * result["hidden"] * STATE_BYTES[side] / 2**30
                d |= {"model_state_growth_gb": state, "rss_growth_beyond_state_gb": grow - state}
            sides[side] = d
        out[axis] = sides
    return out


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
            if axis != "vocab":  # doubling points; the vocabulary axis stays linear, so linear growth looks straight
                ax.set_xscale("log", base=2)
            ax.set_xticks([r["x"] for r in rows], [str(r["x"]) for r in rows])
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        ax_t.legend(fontsize=8)
        b = result.get("base", BASE)
        fixed = {"seq": f"span {b['span']}, vocabulary {b['vocab']}",
                 "vocab": f"{result.get('vocab_seq_len', b['seq_len'])} tokens, span {b['span']}, random-init weights",
                 "span": f"{b['seq_len']} tokens, vocabulary {b['vocab']}"}[axis]
        fig.suptitle(f"one training step, batch {b['batch']}, {result.get('precision', '')}, {fixed} "
                     f"(bench/curves.py --axis {axis})", fontsize=9)
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
    p.add_argument("--json", help="results file (default: bench/results/KIND/curves.json, KIND this machine's CPU kind)")
    p.add_argument("--plot-only", action="store_true", help="only redraw the PNGs from --json")
    p.add_argument("--quick", action="store_true", help="smoke sizes: two small points per axis, not a measurement")
    p.add_argument("--points", action="append", default=[], metavar="AXIS=X,Y,...",
                   help="the points of an axis (repeatable), e.g. span=8,64,256 (default: " +
                        ", ".join(f"{k}={','.join(map(str, v))}" for k, v in AXES.items()) + ")")
    p.add_argument("--vocab-seq-len", type=int, help="trajectory length on the vocab axis (default: the base point's)")
    a = p.parse_args(argv)
    for spec in a.points:
        axis, _, xs = spec.partition("=")
        if axis not in AXES or not xs:
            p.error(f"--points {spec!r}: expected AXIS=X,Y,... with AXIS one of {sorted(AXES)}")
        AXES[axis] = [int(x) for x in xs.split(",")]
    path = Path(a.json or ROOT / "bench" / "results" / cpu_kind(read_isa()) / "curves.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads(path.read_text()) if path.exists() else {}
    if not a.plot_only:
        from opsd.io.models import resolve_precision

        precision = resolve_precision(a.precision, "cpu")
        if a.quick:
            AXES.update(seq=[64, 128], vocab=[49152, 65536], span=[4, 8])
            BASE.update(seq_len=128, span=8, hint=6)
        from transformers import AutoConfig

        from opsd.io import models

        cfg = AutoConfig.from_pretrained(models.default_model_dir())
        result |= {"precision": precision, "base": BASE, "quick": a.quick, "steps": a.steps, "warmup": 1,
                   "vocab_seq_len": a.vocab_seq_len or BASE["seq_len"], "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "tied_embedding": cfg.tie_word_embeddings}
        result.setdefault("axes", {})
        result.setdefault("runs", {})
        memo: dict = {}
        with tempfile.TemporaryDirectory(prefix="opsd-curves-") as d:
            for axis in a.axis or list(AXES):
                print(f"cost curve: {axis} {AXES[axis]} at {precision}", flush=True)
                t0 = time.perf_counter()
                rows = run_axis(axis, precision, a.steps, Path(d), memo=memo,
                                vocab_seq_len=a.vocab_seq_len)
                metas = [v["round"] for r in rows for v in r["sides"].values() if "round" in v and not v.get("reused")]
                result["axes"][axis] = rows
                result["runs"][axis] = {"wall_s": time.perf_counter() - t0, "processes": len(metas),
                                        "child_cpu_s": sum(m["child_cpu_s"] for m in metas),
                                        "loaded_points": sum(bool(m["loaded"]) for m in metas),
                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                path.write_text(json.dumps(result, indent=2))
    result["shape"] = shape(result)
    result["plots"] = plot(result, path.parent)
    path.write_text(json.dumps(result, indent=2))
    print("plots: " + ", ".join(result["plots"]))
    return result


if __name__ == "__main__":
    main()
