"""One distillation step: opsd vs TRL's two distillation trainers, at the same precision, against the FLOP floor.

    flock /tmp/opsd-torch.lock python bench/step.py              # fp32 and bf16, 3 rounds: ~15 min on 2 cores
    flock /tmp/opsd-torch.lock python bench/step.py --quick      # smoke sizes, ~2 min
    python bench/step.py --device cuda --sides opsd,distill --rounds 1 --model DIR   # on a GPU (scripts/gpu_check.sh)

Same model (the embedded SmolLM2-135M), same 4 trajectories of 512 tokens, each ending in a 32-token
error span; a 20-token hint (a user turn) inserted right above the erroneous step for the opsd teacher;
AdamW (same lr, betas, no weight decay), grad clip 1.0, no gradient checkpointing. Sides, each in its
own process (`--side`), alternated A B C D ... in every round, at every precision (`--precisions`;
default `auto`: the precision opsd uses on this machine, and fp32 beside it where that is bf16, so on a
CPU without bf16 units only fp32; bf16 = autocast with fp32 master weights on every side):

- `opsd`: opsd's own training stage functions (`opsd.train`), teacher=self on the hinted sequence (its
  pass starts from the student's keys/values of the prompt above the hint: only hint + reply run).
- `gkd`, `distill`: `trl.experimental.gkd.GKDTrainer` and `trl.DistillationTrainer` (bench/trl_sides.py).
- `opsd_pre` (once, at the precision used): teacher=initial with precomputed top-k targets.
- `matmul` (bench/matmul.py): `torch.mm` GFLOP/s at each precision on the model's GEMM shapes (forward, grad-input and
  grad-weight of every linear layer at M = batch x 512), for the FLOP floor at that precision.

Rounds in which another process used the CPU are discarded and run again (bench/timing.py); the load
average after each side is recorded. Per round, each side's step time is the median of its timed
steps; the ratio opsd / TRL is taken against the faster TRL trainer of that round; headlines are the
lowest round. The last lines are machine-readable (at the precision used: bf16 where the CPU has it):

    ratio_trajectories_per_s=X ratio_peak_rss=Y floor_share=Z     # opsd / faster TRL trainer; opsd vs floor
    bf16_speedup=W                                                # opsd fp32 step / opsd bf16 step
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.matmul import model_path, run_matmul, sync
from bench.timing import child_json_path, run_child, timed_rounds

HINT_TEXT = ("Hint for your next reply: that function is not valid; use one of the tools listed in the system "
             "message, with the parameters its schema requires.")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def peak_gpu_gb() -> float | None:
    """Peak CUDA memory allocated by this process (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() and torch.cuda.is_initialized() else None




# ---------------------------------------------------------------- data: the same trajectories for every side

def synthetic_examples(tok, *, batch: int, seq_len: int, span: int, hint: int):
    """`batch` HintedExamples: `seq_len` real BFCL prompt tokens ending in a `span`-token error span,
    and a teacher copy with a `hint`-token user turn inserted 8 tokens before the span (the step header)."""
    from opsd.io.tasks import load_tasks
    from opsd.render import prompt_ids
    from opsd.types import HintedExample

    stream: list[int] = []
    for task in load_tasks("bfcl:simple_python:train"):  # enough real prompt tokens for (batch + 1) sequences
        stream += prompt_ids(task.messages, task.tools, tok)
        if len(stream) >= (batch + 2) * seq_len:
            break
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, tail = enc("<|im_start|>user\n"), enc("<|im_end|>\n")
    body = enc(HINT_TEXT) * 4
    hint_ids = (head + body[:max(0, hint - len(head) - len(tail))] + tail)[-hint:]  # a user turn of exactly `hint` tokens
    out = []
    for b in range(batch):
        start = b * len(stream) // (batch + 1)
        ids = stream[start:start + seq_len]
        if len(ids) < seq_len:
            raise ValueError(f"not enough prompt tokens for {batch} x {seq_len}")
        s0, s1 = seq_len - span, seq_len
        at = max(1, s0 - 8)  # hint turn right above the erroneous step
        teacher = ids[:at] + hint_ids + ids[at:]
        out.append(HintedExample(ids, teacher, (s0, s1), (s0 + hint, s1 + hint),
                                 {"quote_span": [s0, s1], "hint_tokens": hint}))
    return out


# ---------------------------------------------------------------- side: opsd

def run_opsd(a, precompute: bool) -> dict:
    from opsd.hint.measure import measure
    from opsd.train import run as train
    from opsd.train.config import TrainConfig
    from opsd.train.records import TrainRecord

    out_dir = tempfile.mkdtemp(prefix="bench-step-")
    # critiques: a placeholder (the examples are built here), which also selects the OPSD mode
    cfg = TrainConfig(model=a.model, out=out_dir, critiques="(synthetic HintedExamples)", teacher="initial" if precompute else "self",
                      precompute_targets="yes" if precompute else "no", lr=a.lr, batch_size=a.batch,
                      max_steps=a.warmup + a.steps, precision=getattr(a, "precision", "fp32"),
                      cpu=getattr(a, "device", "cpu") == "cpu", progress=False,
                      min_hint_effect=float("-inf"))
    t0 = time.perf_counter()
    s = train.setup(cfg)  # the stages of `opsd.train.run.main`: setup, (data sources), start, train_step
    load_s = time.perf_counter() - t0
    examples = synthetic_examples(s.tok, batch=a.batch, seq_len=a.seq_len, span=a.span, hint=a.hint)
    records = [TrainRecord.from_example(ex) for ex in examples]
    precompute_s = None
    if precompute:  # what train.data_sources does before training: teacher top-k per span token, once
        t0 = time.perf_counter()
        with s.accelerator.autocast(), s.teacher.model() as t_lm:
            scores = measure(t_lm, s.student.lm, examples, batch_size=cfg.batch_size, top_k=cfg.top_k,
                             temperature=cfg.temperature, pad_id=s.tok.pad_token_id or 0)
        precompute_s = time.perf_counter() - t0
        records = [TrainRecord.from_example(ex, scores=m.scores(), teacher_topk=m.teacher_topk)
                   for ex, m in zip(examples, scores)]
    rss_loaded = peak_rss_gb()
    state = train.start(cfg, s, records)

    times, phases = [], []
    for step in range(a.warmup + a.steps):
        ph = opsd_step(state, step)
        if step >= a.warmup:
            times.append(ph["step"])
            phases.append(ph)
    profile = None
    if a.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            opsd_step(state, a.warmup + a.steps)
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile)
    med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    return {"times": times, "phases": med, "load_s": load_s, "precompute_s": precompute_s,
            "rss_after_load_gb": rss_loaded, "peak_rss_gb": peak_rss_gb(), "peak_gpu_gb": peak_gpu_gb(),
            "student_tokens": sum(len(r.student_ids) for r in records),
            "teacher_tokens": 0 if precompute else teacher_tokens_run(state, records),
            "hinted_tokens": sum(len(r.teacher_ids) for r in records),
            "span_tokens": sum(r.n_targets for r in records),
            "profile": profile}


def teacher_tokens_run(state, records) -> int:
    """Tokens the teacher forward runs per step: the whole hinted sequences, or with teacher=self reusing the
    student's keys/values (`--teacher-reuses-prefix`, the default) only what follows the shared prompt."""
    from opsd.train import step as train_step
    from opsd.train.shared_prefix import common_prefix

    mb = train_step.make_micro_batch(records, state.pad_id)
    if not train_step.reuses_student_kv(state, mb):
        return sum(len(r.teacher_ids) for r in records)
    return sum(len(r.teacher_ids) - common_prefix(r.student_ids, r.teacher_ids, r.teacher_span[0] - 1) for r in records)


def opsd_step(state, step) -> dict:
    """One optimizer step: `opsd.train.step.train_step` (draw, targets, loss, backward, optimizer step), timed per phase."""
    from opsd.train.step import train_step

    t0 = time.perf_counter()
    values = train_step(state, step)
    sync()
    return {"teacher": values["time/teacher_s"], "student_fwd": values["time/student_forward_s"],
            "backward": values["time/backward_s"], "optimizer": values["time/optimizer_s"],
            "step": time.perf_counter() - t0}


# ---------------------------------------------------------------- sides: TRL GKDTrainer, DistillationTrainer

def run_trl_side(a, trainer: str) -> dict:
    from bench.trl_sides import run_trl
    from opsd.io.models import load_tokenizer

    examples = synthetic_examples(load_tokenizer(a.model), batch=a.batch, seq_len=a.seq_len, span=a.span, hint=a.hint)
    return run_trl(a, trainer, a.precision, model_path(a.model), examples, peak_rss_gb)


# ---------------------------------------------------------------- parent: alternate the sides, report

def precisions_for(spec: str, used: str) -> list[str]:
    """The precisions a run compares: `auto` is the one opsd uses on this machine (`used`), with fp32 beside it when
    that is bf16 (for the bf16 speed-up); on a CPU without bf16 units only fp32, since bf16 there is emulated and
    nobody trains at it. Otherwise the comma-separated list as given."""
    if spec == "auto":
        return ["fp32", "bf16"] if used == "bf16" else [used]
    return [x.strip() for x in spec.split(",") if x.strip()]


SIDES = ("opsd", "opsd_pre", "gkd", "distill", "matmul")
TRL = ("gkd", "distill")


def child(side: str, precision: str, a) -> tuple[dict, dict]:
    """Run one side in a fresh process; returns (its JSON result, the round meta from bench/timing.py)."""
    path = child_json_path()
    steps = a.trl_steps if side in TRL else a.steps
    cmd = [sys.executable, __file__, "--side", side, "--precision", precision, "--out-json", path, "--model", a.model,
           "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--span", str(a.span), "--hint", str(a.hint),
           "--steps", str(steps), "--warmup", str(a.warmup), "--lr", str(a.lr), "--matmul-reps", str(a.matmul_reps),
           "--device", a.device]
    if a.profile and side == "opsd" and precision == a.used and not getattr(a, "_profiled", False):
        cmd += ["--profile", str(a.profile)]
        a._profiled = True
    res, meta = run_child(cmd, cwd=ROOT, out_json=path)
    print(f"  {precision} {side:9s} steps {[round(t, 2) for t in res.get('times', [])]}  peak RSS "
          f"{res.get('peak_rss_gb', 0):.2f} GB", flush=True)
    return res, meta


def flops_per_step(r: dict, n_params: float) -> float:
    """The issue's FLOP model: 6N per trained (student) token + 2N per teacher-forward token."""
    return 6 * n_params * r["student_tokens"] + 2 * n_params * r["teacher_tokens"]


def exact_flops_per_step(r: dict, sizes: dict, seq_len: int, n_body: float, side: str) -> float:
    """Matmul FLOPs actually needed: no embedding matmul, causal attention (T/2 average context),
    lm_head only where it is applied (span tokens for opsd and DistillationTrainer, every token for GKD)."""
    attn = 4 * (seq_len / 2) * sizes["d"] * sizes["layers"]  # QK^T and AV per token, forward
    per_fwd = 2 * n_body + attn
    head = 2 * sizes["vocab"] * sizes["d"]
    full = side == "gkd"
    head_student = r["student_tokens"] if full else r["span_tokens"]
    head_teacher = (r["teacher_tokens"] if full else r["span_tokens"]) if r["teacher_tokens"] else 0
    return (3 * per_fwd * r["student_tokens"] + 3 * head * head_student
            + per_fwd * r["teacher_tokens"] + head * head_teacher)


def step_of_round(res: dict) -> float:
    return statistics.median(res["times"])


def summarise_side(side: str, rs: list[dict], a, mm: dict, n_params: float) -> dict:
    sizes = mm["sizes"]
    n_body = n_params - sizes["vocab"] * sizes["d"]  # tied embedding: no matmul at the input
    rate = mm["model_gemm_gflops"] * 1e9
    per_round = [step_of_round(r) for r in rs]
    worst = max(per_round)
    r0 = rs[0]
    fl, fx = flops_per_step(r0, n_params), exact_flops_per_step(r0, sizes, a.seq_len, n_body, side)
    times = [t for r in rs for t in r["times"]]
    return {"rounds": [r["times"] for r in rs], "round_meta": [r["round"] for r in rs], "step_s_per_round": per_round,
            "median_step_s": statistics.median(times), "worst_round_step_s": worst, "n_steps": len(times),
            "trajectories_per_s": a.batch / worst, "student_tokens_per_s": r0["student_tokens"] / worst,
            "peak_rss_gb": max(r["peak_rss_gb"] for r in rs), "rss_after_load_gb": max(r["rss_after_load_gb"] for r in rs),
            "peak_gpu_gb": max((r.get("peak_gpu_gb") or 0.0) for r in rs) or None,
            "student_tokens": r0["student_tokens"], "teacher_tokens": r0["teacher_tokens"],
            "hinted_tokens": r0.get("hinted_tokens"),
            "span_tokens": r0["span_tokens"], "flops_6n2n": fl, "floor_s": fl / rate,
            "floor_share": fl / rate / worst, "flops_exact": fx, "floor_exact_s": fx / rate,
            "floor_share_exact": fx / rate / worst, "phases": r0.get("phases"), "precompute_s": r0.get("precompute_s"),
            "settings": r0.get("settings"), "profile": next((r["profile"] for r in rs if r.get("profile")), None)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512, help="student trajectory length (tokens)")
    p.add_argument("--span", type=int, default=32, help="error span length (tokens), at the end of the trajectory")
    p.add_argument("--hint", type=int, default=20, help="hint length (tokens), in the teacher sequence only")
    p.add_argument("--steps", type=int, default=2, help="timed steps per opsd process")
    p.add_argument("--trl-steps", type=int, default=1, help="timed steps per TRL process (its steps are longer)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    p.add_argument("--rounds", type=int, default=3, help="rounds (each side runs once per round and precision)")
    p.add_argument("--precisions", default="auto",
                   help="precisions compared, each with every side (auto: the one opsd uses here, and fp32 beside bf16)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every side runs")
    p.add_argument("--sides", default="opsd,gkd,distill", help="sides alternated in every round")
    p.add_argument("--no-precomputed", dest="precomputed", action="store_false",
                   help="skip the one opsd_pre run (teacher=initial, precomputed targets) at the precision used")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--reruns", type=int, default=3, help="at most this many rounds run again because others used the CPU")
    p.add_argument("--matmul-reps", type=int, default=20)
    p.add_argument("--profile", type=int, default=0, help="torch.profiler top-N ops of one extra opsd step (0: off)")
    p.add_argument("--quick", action="store_true", help="smoke sizes: batch 2 x 64 tokens, 1+1 steps, 1 round")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.seq_len, a.span, a.hint, a.steps, a.trl_steps, a.warmup, a.rounds, a.matmul_reps = \
            2, 64, 8, 6, 1, 1, 1, 1, 2
    if a.side:  # child process
        res = {"matmul": run_matmul, "gkd": lambda x: run_trl_side(x, "gkd"),
               "distill": lambda x: run_trl_side(x, "distill"), "opsd": lambda x: run_opsd(x, False),
               "opsd_pre": lambda x: run_opsd(x, True)}[a.side](a)
        Path(a.out_json).write_text(json.dumps(res))
        return res

    from opsd.io.models import resolve_precision

    a.used = resolve_precision("auto", a.device)  # the precision opsd runs at here: the headline's
    precisions = precisions_for(a.precisions, a.used)
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    print(f"step benchmark: batch {a.batch} x {a.seq_len} tokens, span {a.span}, hint {a.hint}; {a.warmup} warm-up + "
          f"{a.steps} timed steps per process ({a.trl_steps} for TRL), {a.rounds} round(s) of {sides} at {precisions}; "
          f"precision used: {a.used}", flush=True)
    mm = {pr: child("matmul", pr, a)[0] for pr in precisions}
    order = [(pr, s) for pr in precisions for s in sides]
    runs = timed_rounds([f"{pr}:{s}" for pr, s in order], a.rounds, lambda k: child(k.split(":")[1], k.split(":")[0], a),
                        max_reruns=a.reruns)
    n_params = mm[precisions[0]]["n_params"]
    result = {"config": {k: getattr(a, k) for k in ("model", "batch", "seq_len", "span", "hint", "steps", "trl_steps",
                                                     "warmup", "rounds", "lr", "device")} | {"precisions": precisions,
                                                                                              "used": a.used},
              "matmul": mm, "n_params": n_params, "discarded_rounds": runs["discarded"], "by_precision": {}}
    for pr in precisions:
        summ = {s: summarise_side(s, runs[f"{pr}:{s}"], a, mm[pr], n_params) for s in sides}
        block: dict = {"sides": summ}
        trl = [s for s in sides if s in TRL]
        if "opsd" in summ and trl:
            rr = []
            for i in range(a.rounds):
                faster = min(trl, key=lambda s: summ[s]["step_s_per_round"][i])
                rr.append({"vs": faster, "ratio": summ[faster]["step_s_per_round"][i] / summ["opsd"]["step_s_per_round"][i]})
            block["ratio_per_round"] = rr
            faster = min(trl, key=lambda s: summ[s]["worst_round_step_s"])
            block["faster_trl"] = faster
            block["ratio_trajectories_per_s"] = min(x["ratio"] for x in rr)
            block["ratio_peak_rss"] = summ["opsd"]["peak_rss_gb"] / summ[faster]["peak_rss_gb"]
            if summ["opsd"]["peak_gpu_gb"] and summ[faster]["peak_gpu_gb"]:
                block["ratio_peak_gpu"] = summ["opsd"]["peak_gpu_gb"] / summ[faster]["peak_gpu_gb"]
        if "opsd" in summ:
            block["floor_share"] = summ["opsd"]["floor_share"]
        result["by_precision"][pr] = block
    if "fp32" in precisions and "bf16" in precisions and "opsd" in sides:
        f32, b16 = (result["by_precision"][x]["sides"]["opsd"]["step_s_per_round"] for x in ("fp32", "bf16"))
        result["bf16_speedup_per_round"] = [x / y for x, y in zip(f32, b16)]
        result["bf16_speedup"] = min(result["bf16_speedup_per_round"])
    if a.precomputed and "opsd" in sides:
        res, meta = child("opsd_pre", a.used, a)
        res["round"] = meta
        result["opsd_pre"] = summarise_side("opsd_pre", [res], a, mm.get(a.used) or mm[precisions[0]], n_params)
    head = result["by_precision"].get(a.used) or result["by_precision"][precisions[-1]]
    result |= {k: head[k] for k in ("ratio_trajectories_per_s", "ratio_peak_rss", "ratio_peak_gpu", "floor_share")
               if k in head}
    for pr, block in result["by_precision"].items():
        print(f"{pr}: matmul {mm[pr]['model_gemm_gflops']:.0f} GFLOP/s on the model's GEMMs")
        for s, v in block["sides"].items():
            print(f"  {s:8s} worst-round step {v['worst_round_step_s']:6.2f} s  {v['trajectories_per_s']:.3f} traj/s  "
                  f"peak RSS {v['peak_rss_gb']:.2f} GB  floor share {v['floor_share']:.2f}"
                  + (f"  peak GPU memory {v['peak_gpu_gb']:.2f} GB" if v["peak_gpu_gb"] else ""))
        if "ratio_per_round" in block:
            print("  opsd / faster TRL per round: " + ", ".join(f"{x['ratio']:.2f}x ({x['vs']})" for x in block["ratio_per_round"]))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(" ".join(f"{k}={result[k]:.3f}" for k in ("ratio_trajectories_per_s", "ratio_peak_rss", "floor_share")
                   if k in result))
    if "bf16_speedup" in result:
        print(f"bf16_speedup={result['bf16_speedup']:.3f}")
    return result


if __name__ == "__main__":
    main()
