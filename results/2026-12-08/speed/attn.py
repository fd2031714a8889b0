"""Prefill throughput vs prompt length and attention mask (bf16, 2 threads): where long BFCL prompts lose speed."""
import time, torch
from opsd.io import models
torch.manual_seed(0)
m, tok = models.load("smollm2-135m-instruct", precision="bf16")
dec = m.get_decoder()
print("attn impl:", m.config._attn_implementation, "dtype", next(m.parameters()).dtype)
def run(B, L, padded, reps=2):
    ids = torch.randint(100, 40000, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    if padded:
        mask[0, :L // 3] = 0  # one left-padded row: the mask is not all ones
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        dec(input_ids=ids, attention_mask=mask, position_ids=pos)
        t = time.perf_counter()
        for _ in range(reps):
            dec(input_ids=ids, attention_mask=mask, position_ids=pos)
        dt = (time.perf_counter() - t) / reps
    return B * L / dt
for L in (256, 512, 1024):
    B = max(1, 4096 // L)
    print(f"L={L} B={B}: no padding {run(B, L, False):.0f} tok/s, padded mask {run(B, L, True):.0f} tok/s", flush=True)
