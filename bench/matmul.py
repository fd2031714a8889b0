"""The `matmul` side of bench/step.py: `torch.mm` GFLOP/s at one precision on the model's GEMM shapes (the rate of
the FLOP floor), and the model's parameter count, both from its config alone.

    python bench/step.py --side matmul --precision bf16 --out-json /tmp/mm.json --model smollm2-135m-instruct
"""
from __future__ import annotations

import time


def sync() -> None:
    """Wait for queued CUDA work, so that a wall-clock interval covers it (no-op on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def model_path(name: str) -> str:
    from opsd.io import models

    return str(models.resolve(name))


def n_params_of(model_dir: str) -> int:
    """The model's parameter count (tied weights once), from its config alone (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


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
    """GFLOP/s of `torch.mm` at `a.precision` on the model's GEMM shapes (the FLOP floor's rate), and lm_head shapes."""
    import torch

    from opsd.io.models import DTYPES

    dtype, device = DTYPES[a.precision], getattr(a, "device", "cpu")

    def rate(m, k, n, reps):
        x, w = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(2):
            torch.mm(x, w)
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(x, w)
        sync()
        return 2 * m * k * n * reps, time.perf_counter() - t

    M = a.batch * a.seq_len
    shapes, sizes = model_gemm_shapes(model_path(a.model))
    flops = secs = 0.0
    for k, n in shapes:  # forward y = x W, grad-input dx = dy W^T, grad-weight dW = x^T dy
        for m_, k_, n_ in ((M, k, n), (M, n, k), (k, M, n)):
            fl, s = rate(m_, k_, n_, a.matmul_reps)
            flops, secs = flops + fl, secs + s
    out = {"precision": a.precision, "model_gemm_gflops": flops / secs / 1e9, "M": M, "sizes": sizes,
           "threads": torch.get_num_threads(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "n_params": n_params_of(model_path(a.model))}
    fl, s = rate(a.batch * a.span, sizes["d"], sizes["vocab"], a.matmul_reps)
    out["lm_head_span_gflops"] = fl / s / 1e9  # (B*span, d) @ (d, V): opsd's lm_head
    fl, s = rate(M, sizes["d"], sizes["vocab"], max(1, a.matmul_reps // 4))
    out["lm_head_full_gflops"] = fl / s / 1e9  # (B*T, d) @ (d, V): full logits
    fl, s = rate(1024, 1024, 1024, a.matmul_reps)
    out["square_1024_gflops"] = fl / s / 1e9
    return out
