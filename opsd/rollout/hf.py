"""The hf backend's decode loop: batched generation on a transformers causal LM, greedy-exact.

    from opsd.rollout.hf import generate_batch, DecodeStats
    stats = DecodeStats()
    replies = generate_batch(model, tok, prompts, max_new_tokens=128, stop_text=["</tool_call>"] * len(prompts),
                             stats=stats)          # [(generated ids, "stop" | "eos" | "length"), ...]

Where the time goes on a CPU (bench/rollout.py --profile; BENCHMARKS.md §3): prefill runs near the
GEMM rate, so it costs what the prompt tokens cost; a decode step costs the decoder's matmuls at
M = rows, the attention over the KV cache (about 2 ms per layer at 64 rows x 420 positions in bf16,
bound by memory bandwidth) and, with transformers' DynamicCache, a copy of the whole KV cache per
step (`aten::cat`, 46% of a 64-row bf16 step). So this loop:

- prefills the tokens all prompts share (the tools preamble) once, then each distinct prompt's own
  tokens once, in length-sorted chunks of <= PREFILL_TOKENS tokens (little padding): the samples of
  one task share its prompt KV (copied, not recomputed);
- keeps the KV in buffers allocated once (`PreallocatedLayer`): a step writes one column in place
  and attends over a view, so there is no per-step copy; the results are those of DynamicCache;
- decodes many rows at once (`auto_batch_size`: from free memory, capped where a CPU step stops
  getting cheaper per row), and drops finished rows from the cache in batches rather than one by one;
- stops a row at its stop text or an end-of-turn id.

Greedy decoding gives HF `generate`'s tokens (tests/rollout/test_rollout.py checks this against
`model.generate`, row by row, in fp32).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from opsd.io import models
from opsd.io.tasks import Task
from opsd.render import eot_ids, prompt_ids
from opsd.rollout.config import STOP_TEXT, RolloutConfig

# Prefill forwards of more than about a thousand tokens got slower per token on 2 CPU cores (bf16, 64 BFCL
# prompts: 1758 / 1350 tok/s in chunks of <= 1024 tokens, 1074 / 1248 at 2048, 857 / 1044 at 4096, two passes).
PREFILL_TOKENS = 1024
MIN_SHARED_PREFIX = 16  # a prefix all prompts share (the tools preamble: 56 tokens on BFCL) is prefilled once
# Decode throughput per row stops improving past ~48 rows on 2 CPU cores (bf16: 267 tok/s at 8 rows,
# 460 at 32-48, 430 at 64 with DynamicCache); a GPU keeps gaining far longer.
MAX_ROWS = {"cpu": 64, "cuda": 256}
MEMORY_SHARE = 0.25  # share of free memory the KV cache and logits of one batch may take


@dataclass
class DecodeStats:
    """Where a rollout's time went: prompt tokens (distinct prompts, no padding) vs generated tokens."""
    rows: int = 0
    prompt_tokens: int = 0  # tokens of the distinct prompts that were prefilled
    shared_prompt_tokens: int = 0  # prompt tokens not recomputed: a task's samples, and the prefix all prompts share
    padded_prefill_tokens: int = 0  # tokens actually run through prefill forwards (padding included)
    prefill_s: float = 0.0
    generated_tokens: int = 0  # tokens kept in replies (end-of-turn ids not counted)
    decode_steps: int = 0
    row_steps: int = 0  # rows x steps actually computed (finished rows still in the batch included)
    decode_s: float = 0.0

    def add(self, other: DecodeStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def summary(self) -> dict:
        out = asdict(self)
        out["prompt_tokens_per_s"] = self.prompt_tokens / self.prefill_s if self.prefill_s else None
        out["generated_tokens_per_s"] = self.generated_tokens / self.decode_s if self.decode_s else None
        return out


# ----------------------------------------------------------------------------- KV cache

class PreallocatedLayer(DynamicLayer):
    """One layer's KV in buffers of `capacity` positions, written in place; `keys`/`values` are views of
    the filled part, so the model sees exactly what DynamicLayer would give it, without a copy per step."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def allocate(self, rows: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        self.dtype, self.device = dtype, device
        self.key_buf = torch.zeros((rows, heads, self.capacity, head_dim), dtype=dtype, device=device)  # (B, H, C, D)
        self.value_buf = torch.zeros_like(self.key_buf)
        self.is_initialized = True
        self._views()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.allocate(B, H, D, key_states.dtype, key_states.device)

    def _views(self) -> None:
        self.keys, self.values = self.key_buf[:, :, :self.length], self.value_buf[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV cache full: {self.length} + {n} > capacity {self.capacity}")
        self.key_buf[:, :, self.length:self.length + n] = key_states
        self.value_buf[:, :, self.length:self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (new buffers; only the filled part is copied)."""
        key_buf = self.key_buf.new_zeros((len(indices),) + self.key_buf.shape[1:])
        value_buf = torch.zeros_like(key_buf)
        key_buf[:, :, :self.length] = self.keys.index_select(0, indices)
        value_buf[:, :, :self.length] = self.values.index_select(0, indices)
        self.key_buf, self.value_buf = key_buf, value_buf
        self._views()


def preallocated_cache(n_layers: int, capacity: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [PreallocatedLayer(capacity) for _ in range(n_layers)]
    return cache


def expects_parallel(task: Task) -> bool:
    """Whether a task's reply may hold several calls (then it does not stop at the first </tool_call>)."""
    return "parallel" in str(task.meta.get("category", "")) or len(task.ground_truth or []) > 1


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _kv_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder-only model."""
    c = _text_config(model)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or heads, head_dim


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on `device`: CUDA's free bytes, or MemAvailable from /proc/meminfo (4 GiB if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 4 << 30


def auto_batch_size(model, *, max_prompt_tokens: int, max_new_tokens: int, free_bytes: int | None = None) -> int:
    """Rows to decode together: as many as MEMORY_SHARE of free memory holds (KV cache of the longest
    prompt + the budget, fp32 logits), at most MAX_ROWS for the device type, at least 1."""
    dev = next(model.parameters()).device
    layers, kv_heads, head_dim = _kv_shape(model)
    elem = next(model.parameters()).element_size()
    kv_row = 2 * layers * kv_heads * head_dim * (max_prompt_tokens + max_new_tokens) * elem
    logits_row = 2 * _text_config(model).vocab_size * 4  # (B, V) logits and their fp32 copy for sampling
    free = free_memory_bytes(dev) if free_bytes is None else free_bytes
    rows = int(MEMORY_SHARE * free // max(1, kv_row + logits_row))
    return max(1, min(rows, MAX_ROWS.get(dev.type, 64)))


# ----------------------------------------------------------------------------- decoding

def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else nucleus sampling with `gen`."""
    if temperature == 0:
        return logits_BV.float().argmax(-1)
    probs = (logits_BV.float() / temperature).softmax(-1)  # (B, V)
    if top_p < 1:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p
        sp[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _prefill_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive index groups (lengths sorted longest first) whose padded size stays within `budget` tokens."""
    chunks, cur = [], []
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1) * lengths[cur[0]] > budget:
            chunks.append(cur)
            cur = []
        cur.append(i)
    return chunks + ([cur] if cur else [])


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens all prompts start with (the system prompt's preamble, say), leaving each at least one of its own;
    0 when fewer than MIN_SHARED_PREFIX or only one prompt."""
    if len(prompts) < 2:
        return 0
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return n if n >= MIN_SHARED_PREFIX else 0


@torch.no_grad()
def _prefill(model, prompts: list[list[int]], rows_of: list[list[int]], cache: DynamicCache, attn_BC: torch.Tensor,
             pad: int, stats: DecodeStats) -> torch.Tensor:
    """Run the shared prefix once and each distinct prompt's rest once; write the KV into the rows that use it.

    prompts: distinct prompts, longest first; rows_of[u]: the batch rows of prompt u. Row layout in the
    cache: [shared prefix][padding][the prompt's own tokens, ending at L]; the attention mask (attn_BC,
    already set by the caller) is 0 on the padding. Returns the last-position logits of every row (B, V)."""
    dev = attn_BC.device
    L = len(prompts[0])
    P = shared_prefix_length(prompts)
    layers = cache.layers
    prefix_kv = None
    if P:
        part = DynamicCache()
        model(input_ids=torch.tensor([prompts[0][:P]], device=dev), past_key_values=part, use_cache=True,
              logits_to_keep=1)
        prefix_kv = [(x.keys, x.values) for x in part.layers]  # (1, H, P, D) per layer
        stats.padded_prefill_tokens += P
        stats.shared_prompt_tokens += P * (len(prompts) - 1)
    logits_rows: dict[int, torch.Tensor] = {}
    for chunk in _prefill_chunks([len(p) - P for p in prompts], PREFILL_TOKENS):
        Lc = len(prompts[chunk[0]]) - P  # longest own part in the chunk
        b = len(chunk)
        ids_bL = torch.full((b, Lc), pad, dtype=torch.long)
        own_bL = torch.zeros((b, Lc), dtype=torch.long)
        for i, u in enumerate(chunk):
            ids_bL[i, Lc - (len(prompts[u]) - P):] = torch.tensor(prompts[u][P:])
            own_bL[i, Lc - (len(prompts[u]) - P):] = 1
        ids_bL, own_bL = ids_bL.to(dev), own_bL.to(dev)
        pos_bL = P + (own_bL.cumsum(-1) - 1).clamp(min=0)  # positions after the shared prefix
        attn = torch.cat([own_bL.new_ones((b, P)), own_bL], dim=1)  # (b, P + Lc)
        part = DynamicCache()
        for li, (k, v) in enumerate(prefix_kv or []):
            part.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), li)
        out = model(input_ids=ids_bL, attention_mask=attn, position_ids=pos_bL, past_key_values=part,
                    use_cache=True, logits_to_keep=1)
        stats.padded_prefill_tokens += ids_bL.numel()
        for li, (layer, src) in enumerate(zip(layers, part.layers)):
            if not getattr(layer, "is_initialized", False):
                layer.allocate(attn_BC.shape[0], src.keys.shape[1], src.keys.shape[-1], src.keys.dtype, dev)
                if P:
                    layer.key_buf[:, :, :P] = prefix_kv[li][0]
                    layer.value_buf[:, :, :P] = prefix_kv[li][1]
            for i, u in enumerate(chunk):
                rows = torch.tensor(rows_of[u], device=dev)
                # index_put does not cast, unlike the slice writes of `update`: under bf16 autocast the keys come
                # out fp32 (RoPE multiplies by fp32 cos/sin) and the values bf16, and the buffers take the keys' dtype
                layer.key_buf[rows, :, L - Lc:L] = src.keys[i, :, P:].to(layer.key_buf.dtype)
                layer.value_buf[rows, :, L - Lc:L] = src.values[i, :, P:].to(layer.value_buf.dtype)
        for i, u in enumerate(chunk):
            for r in rows_of[u]:
                logits_rows[r] = out.logits[i, -1]
    for layer in layers:
        layer.length = L
        layer._views()
    return torch.stack([logits_rows[r] for r in range(attn_BC.shape[0])])  # (B, V)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, stop_text: list[str | None],
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   stats: DecodeStats | None = None) -> list[tuple[list[int], str]]:
    """Decode a batch of prompts; returns (generated ids without the end-of-turn id, finish reason) per row.

    Identical prompts (samples of one task) are prefilled once. Rows are left-padded to a common
    end; a finished row stops producing tokens at once and leaves the batch (and the KV cache) at
    the next compaction, which happens when a quarter of the rows have finished.
    """
    stats = stats if stats is not None else DecodeStats()
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = set(eot_ids(tokenizer, model))  # (render.eot_ids: the one definition every backend uses)
    B = len(prompts)
    distinct: dict[tuple[int, ...], int] = {}
    for p in sorted(map(tuple, prompts), key=len, reverse=True):
        distinct.setdefault(p, len(distinct))
    uniq = [list(p) for p in distinct]
    rows_of: list[list[int]] = [[] for _ in uniq]
    for r, p in enumerate(prompts):
        rows_of[distinct[tuple(p)]].append(r)
    L = len(uniq[0])
    stats.rows += B
    stats.prompt_tokens += sum(map(len, uniq))
    stats.shared_prompt_tokens += sum(map(len, prompts)) - sum(map(len, uniq))

    t0 = time.perf_counter()
    cache = preallocated_cache(_kv_shape(model)[0], L + max_new_tokens)
    attn_BC = torch.zeros((B, L + max_new_tokens), dtype=torch.long, device=dev)  # (B, capacity): 1 = attend
    P = shared_prefix_length(uniq)
    attn_BC[:, :P] = 1  # the shared prefix, then each row's own tokens right-aligned at L
    for r, p in enumerate(prompts):
        attn_BC[r, L - (len(p) - P):L] = 1
    logits_BV = _prefill(model, uniq, rows_of, cache, attn_BC, pad, stats)
    stats.prefill_s += time.perf_counter() - t0

    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = list(range(B))  # batch row -> original row
    alive = [True] * B  # per batch row: still generating
    outs: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    last_pos = torch.tensor([len(p) - 1 for p in prompts], device=dev)  # (B,)
    length = L
    for step in range(max_new_tokens):
        nxt = sample_next(logits_BV, temperature, top_p, gen).cpu()
        for j, r in enumerate(rows):
            if not alive[j]:
                continue
            t = int(nxt[j])
            if t in eos:
                finish[r], alive[j] = "eos", False
                continue
            outs[r].append(t)
            st = stop_text[r]
            if st and st in tokenizer.decode(outs[r][-12:], skip_special_tokens=False):
                finish[r], alive[j] = "stop", False
        n_alive = sum(alive)
        if not n_alive or step + 1 >= max_new_tokens:
            break
        if len(rows) - n_alive >= max(1, len(rows) // 4):  # compact: drop finished rows from the batch and cache
            keep = [j for j in range(len(rows)) if alive[j]]
            idx = torch.tensor(keep, device=dev)
            cache.batch_select_indices(idx)
            attn_BC, last_pos, nxt = attn_BC[idx], last_pos[idx], nxt[keep]
            rows, alive = [rows[j] for j in keep], [True] * len(keep)
        attn_BC[:, length] = 1
        length += 1
        last_pos = last_pos + 1
        out = model(input_ids=nxt.to(dev)[:, None], attention_mask=attn_BC[:, :length], position_ids=last_pos[:, None],
                    past_key_values=cache, use_cache=True)
        logits_BV = out.logits[:, -1]
        stats.decode_steps += 1
        stats.row_steps += len(rows)
    stats.decode_s += time.perf_counter() - t0
    stats.generated_tokens += sum(map(len, outs))
    return [(outs[b], finish[b]) for b in range(B)]


def run_hf(cfg: RolloutConfig, todo: list[tuple[Task, int, str]], writer) -> DecodeStats:
    """The hf backend of `opsd rollout`: every (task, sample, key) in `todo`, replies to `writer`.

    Prompts are sorted longest first and cut into batches of `cfg.batch_size` rows (0: from free
    memory); the samples of one task stay together, so they share the prompt's prefill."""
    model, tok = models.load(cfg.model, device=cfg.device, precision=cfg.precision)
    prefill = cfg.resolved_prefill()
    prefill_ids = tok(prefill, add_special_tokens=False)["input_ids"] if prefill else []
    items = [(task, k, key, prompt_ids(task.messages, task.tools, tok) + prefill_ids) for task, k, key in todo]
    items.sort(key=lambda it: -len(it[3]))  # stable: a task's samples stay adjacent
    rows = cfg.batch_size or auto_batch_size(model, max_prompt_tokens=len(items[0][3]) if items else 1,
                                             max_new_tokens=cfg.max_new_tokens)
    stats = DecodeStats()
    for i in range(0, len(items), rows):
        chunk = items[i:i + rows]
        try:
            res = generate_batch(
                model, tok, [p for *_, p in chunk], max_new_tokens=cfg.max_new_tokens,
                stop_text=[STOP_TEXT if cfg.stop_at_call and not expects_parallel(t) else None for t, *_ in chunk],
                temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + i, stats=stats)
        except Exception as e:  # recorded, retried on the next run
            for task, k, key, _ in chunk:
                writer.error(task, k, key, repr(e))
            continue
        for (task, k, key, _), (gen_ids, finish) in zip(chunk, res):
            ids = prefill_ids + gen_ids
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            writer.reply(task, k, key, text, token_ids=ids, finish=finish)
    return stats
