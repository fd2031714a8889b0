"""One distillation step: opsd vs TRL's `GKDTrainer`, against this machine's matmul FLOP floor.

    flock /tmp/opsd-torch.lock python bench/step.py              # full: ~9 min on 2 cores
    flock /tmp/opsd-torch.lock python bench/step.py --quick      # smoke sizes, ~1 min

Same model (the embedded SmolLM2-135M, fp32), same 4 trajectories of 512 tokens, each ending in a
32-token error span, a 20-token hint (a user turn) inserted right above the erroneous step for
the opsd teacher; AdamW (same lr, betas, no weight decay), grad clip 1.0, no gradient
checkpointing. Sides, each in its own process (`--side`), alternated A B C A B C:

- `trl`: `trl.experimental.gkd.GKDTrainer` set up as its docs do: student and teacher as two
  model copies, lmbda=0 (the given trajectories, no generation), beta=0.5, bf16 and gradient
  checkpointing turned off (TRL turns both on by default, even on CPU). The data is pre-tokenised,
  so a 6-line collator passes the same ids with labels = -100 outside the span. TRL's teacher
  reads the student's input ids: it cannot see the hint (a limit of GKDTrainer).
- `opsd`: opsd's own stage functions (`opsd.train`: setup_accelerator, load_student,
  load_teacher, step_batches, make_micro_batch, teacher_targets, student_loss), teacher=self on
  the hinted sequence. `train.main` has no per-step function, so the ~10 lines of its loop body
  that do backward / clip / optimizer step are mirrored in `opsd_step` below.
- `opsd_pre`: teacher=initial --precompute-targets: `opsd.train.teachers.measure` stores the teacher's
  top-256 per span token once (timed separately), and steps use the top-k loss.
- `matmul`: fp32 `torch.mm` GFLOP/s on the model's GEMM shapes (forward, grad-input and
  grad-weight of every linear layer at M = batch x 512), for the FLOP floor.

Warm-up steps are excluded; the median step time over all timed steps of all rounds is
reported, with peak RSS (`resource.getrusage` in the child). The last line is machine-readable:

    ratio_trajectories_per_s=X ratio_peak_rss=Y floor_share=Z     # ratios are opsd / TRL
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HINT_TEXT = ("Hint for your next reply: that function is not valid; use one of the tools listed in the system "
             "message, with the parameters its schema requires.")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ---------------------------------------------------------------- data: the same trajectories for every side

def synthetic_examples(tok, *, batch: int, seq_len: int, span: int, hint: int):
    """`batch` HintedExamples: `seq_len` real BFCL prompt tokens ending in a `span`-token error span,
    and a teacher copy with a `hint`-token user turn inserted 8 tokens before the span (the step header)."""
    from opsd.io.tasks import load_tasks
    from opsd.render import prompt_ids
    from opsd.types import HintedExample

    tasks = load_tasks("bfcl:simple_python:train", limit=4 * batch)
    stream = [t for task in tasks for t in prompt_ids(task.messages, task.tools, tok)]
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
    import torch

    from opsd.train import run as train
    from opsd.train.config import TrainConfig
    from opsd.train.scoring import SpanLM
    from opsd.train.teachers import measure

    out_dir = tempfile.mkdtemp(prefix="bench-step-")
    # critiques: a placeholder (the examples are built here), which also selects the OPSD mode
    cfg = TrainConfig(model=a.model, out=out_dir, critiques="(synthetic HintedExamples)", teacher="initial" if precompute else "self",
                 precompute_targets=precompute, lr=a.lr, batch_size=a.batch, max_steps=a.warmup + a.steps,
                 mixed_precision="no", cpu=True, progress=False, min_hint_effect=float("-inf"))
    acc = train.setup_accelerator(cfg)
    t0 = time.perf_counter()
    lm, tok = train.load_student(cfg, acc.device)
    teacher = train.load_teacher(cfg, lm, tok, acc)
    load_s = time.perf_counter() - t0
    pad_id = tok.pad_token_id or 0
    examples = synthetic_examples(tok, batch=a.batch, seq_len=a.seq_len, span=a.span, hint=a.hint)
    records = [ex.to_dict() for ex in examples]
    precompute_s = None
    if precompute:  # what train.build_dataset does before training: teacher top-k per span token, once
        t0 = time.perf_counter()
        scores = measure(teacher, lm, examples, batch_size=cfg.batch_size, top_k=cfg.top_k,
                         temperature=cfg.temperature, pad_id=pad_id)
        precompute_s = time.perf_counter() - t0
        records = [{**r, **s} for r, s in zip(records, scores)]
        teacher = None
    rss_loaded = peak_rss_gb()
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.lr_lambda(cfg, cfg.max_steps))
    span_lm, optimizer = acc.prepare(SpanLM(lm), optimizer)

    times, phases = [], []
    for step in range(a.warmup + a.steps):
        ph = opsd_step(step, records, cfg, span_lm, teacher, optimizer, scheduler, acc, pad_id, lm)
        if step >= a.warmup:
            times.append(ph["step"])
            phases.append(ph)
    profile = None
    if a.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            opsd_step(a.warmup + a.steps, records, cfg, span_lm, teacher, optimizer, scheduler, acc, pad_id, lm)
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile)
    med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    return {"times": times, "phases": med, "load_s": load_s, "precompute_s": precompute_s,
            "rss_after_load_gb": rss_loaded, "peak_rss_gb": peak_rss_gb(),
            "student_tokens": sum(len(r["student_ids"]) for r in records),
            "teacher_tokens": 0 if precompute else sum(len(r["teacher_ids"]) for r in records),
            "span_tokens": sum(r["student_span"][1] - r["student_span"][0] for r in records),
            "profile": profile}


def opsd_step(step, records, cfg, span_lm, teacher, optimizer, scheduler, acc, pad_id, lm) -> dict:
    """One optimizer step through opsd.train's stages; mirrors the loop body of `train.main`."""
    from opsd.train import run as train

    t0 = time.perf_counter()
    mine, window = train.step_batches(len(records), step, cfg, 0, 1)
    n_tokens = sum(records[i]["student_span"][1] - records[i]["student_span"][0] for i in window)
    ph = {"teacher": 0.0, "student_fwd": 0.0, "backward": 0.0}
    for idx in mine:
        t = time.perf_counter()
        mb = train.make_micro_batch([records[i] for i in idx], pad_id)
        targets = train.teacher_targets(teacher, mb)
        ph["teacher"] += time.perf_counter() - t
        t = time.perf_counter()
        div_sum, stats = train.student_loss(span_lm, mb, targets, cfg, acc.device)
        ph["student_fwd"] += time.perf_counter() - t
        t = time.perf_counter()
        acc.backward(div_sum / n_tokens)
        ph["backward"] += time.perf_counter() - t
    t = time.perf_counter()
    acc.clip_grad_norm_(span_lm.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if teacher is not None:
        teacher.update(lm)
    ph["optimizer"] = time.perf_counter() - t
    ph["step"] = time.perf_counter() - t0
    return ph


# ---------------------------------------------------------------- side: TRL GKDTrainer

def run_trl(a) -> dict:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from opsd.io import models

    t0 = time.perf_counter()
    student, tok = models.load(a.model, device="cpu", dtype=torch.float32)
    teacher, _ = models.load(a.model, device="cpu", dtype=torch.float32)  # the second copy GKD needs
    load_s = time.perf_counter() - t0
    examples = synthetic_examples(tok, batch=a.batch, seq_len=a.seq_len, span=a.span, hint=a.hint)
    rows = [{"input_ids": ex.student_ids,
             "labels": [-100] * ex.student_span[0] + ex.student_ids[slice(*ex.student_span)]
             + [-100] * (len(ex.student_ids) - ex.student_span[1])} for ex in examples]

    def collate(feats):  # pre-tokenised rows, all the same length
        ids = torch.tensor([f["input_ids"] for f in feats])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([f["labels"] for f in feats])}

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.times = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.begin)

    timer = StepTimer()
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    args = GKDConfig(output_dir=out_dir, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                     max_steps=a.warmup + a.steps, learning_rate=a.lr, lr_scheduler_type="cosine",
                     optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
                     lmbda=0.0, beta=0.5, temperature=1.0, bf16=False, fp16=False, gradient_checkpointing=False,
                     use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**6,
                     dataloader_num_workers=0, seed=0, max_length=None, disable_tqdm=True)
    rss_loaded = peak_rss_gb()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows * 64),
                         processing_class=tok, data_collator=collate, callbacks=[timer])
    settings = {"bf16": trainer.args.bf16, "gradient_checkpointing": trainer.args.gradient_checkpointing,
                "optimizer": type(trainer.create_optimizer()).__name__, "lmbda": trainer.lmbda, "beta": trainer.beta,
                "student_dtype": str(next(trainer.model.parameters()).dtype),
                "teacher_dtype": str(next(trainer.teacher_model.parameters()).dtype)}
    trainer.train()
    return {"times": timer.times[a.warmup:], "load_s": load_s, "rss_after_load_gb": rss_loaded,
            "peak_rss_gb": peak_rss_gb(), "student_tokens": sum(len(r["input_ids"]) for r in rows),
            "teacher_tokens": sum(len(r["input_ids"]) for r in rows),
            "span_tokens": sum(ex.student_span[1] - ex.student_span[0] for ex in examples), "settings": settings}


# ---------------------------------------------------------------- side: matmul GFLOP/s

def model_gemm_shapes(model_dir: str | None = None) -> tuple[list[tuple[int, int]], dict]:
    """(in, out) of every linear layer in one decoder layer, and the model's sizes (from its config)."""
    from transformers import AutoConfig

    from opsd.io import models

    cfg = AutoConfig.from_pretrained(model_dir or models.default_model_dir())
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    return shapes, {"d": d, "ffn": f, "kv": kv, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size}


def run_matmul(a) -> dict:
    import torch

    def rate(m, k, n, reps):
        x, w = torch.randn(m, k), torch.randn(k, n)
        for _ in range(2):
            torch.mm(x, w)
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(x, w)
        return 2 * m * k * n * reps, time.perf_counter() - t

    M = a.batch * a.seq_len
    shapes, sizes = model_gemm_shapes()
    flops = secs = 0.0
    for k, n in shapes:  # forward y = x W, grad-input dx = dy W^T, grad-weight dW = x^T dy
        for m_, k_, n_ in ((M, k, n), (M, n, k), (k, M, n)):
            fl, s = rate(m_, k_, n_, a.matmul_reps)
            flops, secs = flops + fl, secs + s
    out = {"model_gemm_gflops": flops / secs / 1e9, "M": M, "sizes": sizes, "threads": torch.get_num_threads()}
    fl, s = rate(a.batch * a.span, sizes["d"], sizes["vocab"], a.matmul_reps)
    out["lm_head_span_gflops"] = fl / s / 1e9  # (B*span, d) @ (d, V): opsd's lm_head
    fl, s = rate(M, sizes["d"], sizes["vocab"], max(1, a.matmul_reps // 4))
    out["lm_head_full_gflops"] = fl / s / 1e9  # (B*T, d) @ (d, V): full logits
    fl, s = rate(1024, 1024, 1024, a.matmul_reps)
    out["square_1024_gflops"] = fl / s / 1e9
    return out


# ---------------------------------------------------------------- parent: alternate the sides, report

def child(side: str, a) -> dict:
    """Run one side in a fresh process; returns its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, __file__, "--side", side, "--out-json", path, "--model", a.model,
           "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--span", str(a.span), "--hint", str(a.hint),
           "--steps", str(a.trl_steps if side == "trl" else a.steps), "--warmup", str(a.warmup), "--lr", str(a.lr),
           "--matmul-reps", str(a.matmul_reps)]
    if a.profile and side == "opsd" and not getattr(a, "_profiled", False):
        cmd += ["--profile", str(a.profile)]
        a._profiled = True
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"side {side} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(Path(path).read_text())
    res["wall_s"] = time.perf_counter() - t0
    print(f"  {side:9s} steps {[round(t, 2) for t in res.get('times', [])]}  peak RSS "
          f"{res.get('peak_rss_gb', 0):.2f} GB  ({res['wall_s']:.0f} s)", flush=True)
    return res


def flops_per_step(r: dict, n_params: float) -> float:
    """The issue's FLOP model: 6N per trained (student) token + 2N per teacher-forward token."""
    return 6 * n_params * r["student_tokens"] + 2 * n_params * r["teacher_tokens"]


def exact_flops_per_step(r: dict, sizes: dict, seq_len: int, n_body: float) -> float:
    """Matmul FLOPs actually needed: no embedding matmul, causal attention (T/2 average context),
    lm_head only where it is applied (span tokens for opsd, every token for TRL)."""
    attn = 4 * (seq_len / 2) * sizes["d"] * sizes["layers"]  # QK^T and AV per token, forward
    per_fwd = 2 * n_body + attn
    head = 2 * sizes["vocab"] * sizes["d"]
    head_tokens_student = r["span_tokens"] if r["side"] != "trl" else r["student_tokens"]
    head_tokens_teacher = (r["span_tokens"] if r["side"] != "trl" else r["teacher_tokens"]) if r["teacher_tokens"] else 0
    return (3 * per_fwd * r["student_tokens"] + 3 * head * head_tokens_student
            + per_fwd * r["teacher_tokens"] + head * head_tokens_teacher)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512, help="student trajectory length (tokens)")
    p.add_argument("--span", type=int, default=32, help="error span length (tokens), at the end of the trajectory")
    p.add_argument("--hint", type=int, default=20, help="hint length (tokens), in the teacher sequence only")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--trl-steps", type=int, default=2, help="timed steps per TRL process (its steps are ~4x longer)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="A B C rounds (each side runs once per round)")
    p.add_argument("--sides", default="trl,opsd,opsd_pre")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--matmul-reps", type=int, default=20)
    p.add_argument("--profile", type=int, default=0, help="torch.profiler top-N ops of one extra opsd step (0: off)")
    p.add_argument("--quick", action="store_true", help="smoke sizes: batch 2 x 64 tokens, 1+1 steps, 1 round")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--side", choices=["opsd", "opsd_pre", "trl", "matmul"], help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.seq_len, a.span, a.hint, a.steps, a.trl_steps, a.warmup, a.rounds, a.matmul_reps = \
            2, 64, 8, 6, 1, 1, 1, 1, 2
    if a.side:  # child process
        res = {"matmul": run_matmul, "trl": run_trl, "opsd": lambda x: run_opsd(x, False),
               "opsd_pre": lambda x: run_opsd(x, True)}[a.side](a)
        Path(a.out_json).write_text(json.dumps(res))
        return res

    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    print(f"step benchmark: batch {a.batch} x {a.seq_len} tokens, span {a.span}, hint {a.hint}; {a.warmup} warm-up + "
          f"{a.steps} timed steps per process ({a.trl_steps} for TRL), {a.rounds} round(s) of {sides}", flush=True)
    mm = child("matmul", a)
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(a.rounds):
        for s in sides:
            runs[s].append(child(s, a))
    n_params = 134.5e6
    sizes = mm["sizes"]
    n_body = n_params - sizes["vocab"] * sizes["d"]  # tied embedding: no matmul at the input
    rate = mm["model_gemm_gflops"] * 1e9
    summary = {}
    for s, rs in runs.items():
        times = [t for r in rs for t in r["times"]]
        med = statistics.median(times)
        r0 = dict(rs[0], side=s)
        fl = flops_per_step(r0, n_params)
        fx = exact_flops_per_step(r0, sizes, a.seq_len, n_body)
        summary[s] = {"rounds": [r["times"] for r in rs], "median_step_s": med, "min_step_s": min(times), "max_step_s": max(times), "n_steps": len(times),
                      "trajectories_per_s": a.batch / med, "student_tokens_per_s": r0["student_tokens"] / med,
                      "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
                      "rss_after_load_gb": max(r["rss_after_load_gb"] for r in rs),
                      "student_tokens": r0["student_tokens"], "teacher_tokens": r0["teacher_tokens"],
                      "span_tokens": r0["span_tokens"],
                      "flops_6n2n": fl, "floor_s": fl / rate, "floor_share": fl / rate / med,
                      "flops_exact": fx, "floor_exact_s": fx / rate, "floor_share_exact": fx / rate / med,
                      "phases": rs[0].get("phases"), "precompute_s": rs[0].get("precompute_s"),
                      "settings": rs[0].get("settings"), "profile": next((r["profile"] for r in rs if r.get("profile")), None)}
    result = {"config": {k: getattr(a, k) for k in ("model", "batch", "seq_len", "span", "hint", "steps", "trl_steps",
                                                     "warmup", "rounds", "lr")},
              "matmul": mm, "sides": summary, "n_params": n_params}
    o, t = summary.get("opsd"), summary.get("trl")
    if o and t:
        result |= {"ratio_trajectories_per_s": o["trajectories_per_s"] / t["trajectories_per_s"],
                   "ratio_peak_rss": o["peak_rss_gb"] / t["peak_rss_gb"]}
    if o:
        result["floor_share"] = o["floor_share"]
    print(f"matmul fp32: model GEMMs {mm['model_gemm_gflops']:.1f} GFLOP/s, lm_head span {mm['lm_head_span_gflops']:.1f}, "
          f"lm_head full {mm['lm_head_full_gflops']:.1f}, 1024^3 {mm['square_1024_gflops']:.1f} ({mm['threads']} threads)")
    for s, v in summary.items():
        print(f"{s:9s} median {v['median_step_s']:6.2f} s  {v['trajectories_per_s']:.3f} traj/s  "
              f"{v['student_tokens_per_s']:6.1f} student tok/s  peak RSS {v['peak_rss_gb']:.2f} GB  "
              f"floor share {v['floor_share']:.2f} (6N/2N)  {v['floor_share_exact']:.2f} (exact matmul FLOPs)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(" ".join(f"{k}={result[k]:.3f}" for k in ("ratio_trajectories_per_s", "ratio_peak_rss", "floor_share")
                   if k in result))
    return result


if __name__ == "__main__":
    main()
