"""`ServeConfig`: how to start an inference server for rollouts (flags and YAML come from its fields).

    from opsd.serve.config import ServeConfig
    ServeConfig(model="smollm2-135m-instruct", log="runs/r/server.log")

Only vLLM is started here (from its own venv, `make vllm`); SGLang servers are driven through their
endpoints (`opsd.serve.adapters`) once you have started them yourself.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ENGINES = ("vllm", "sglang")
VLLM_PYTHON_ENV = "OPSD_VLLM_PYTHON"  # python of the vLLM venv; default .venv-vllm/bin/python next to the repo
VLLM_VENV = ".venv-vllm"  # the folder `make vllm` creates, in the repository root
REPO_ROOT = Path(__file__).resolve().parents[2]  # opsd/serve/config.py -> the checkout (or site-packages)


def vllm_python_candidates() -> list[Path]:
    """Where `.venv-vllm/bin/python` is looked for, in order: the repository this opsd runs from (where
    `make vllm` puts it), next to the venv that runs opsd (`.venv` and `.venv-vllm` side by side), then
    the current directory. Never only the current directory: `opsd serve` works from any folder."""
    roots = [REPO_ROOT, Path(sys.prefix).resolve().parent, Path.cwd()]
    out: list[Path] = []
    for root in roots:
        p = root / VLLM_VENV / "bin" / "python"
        if p not in out:
            out.append(p)
    return out


def default_vllm_python() -> str:
    """$OPSD_VLLM_PYTHON, else the first `.venv-vllm/bin/python` of `vllm_python_candidates()` that exists
    (none: the repository's, so the error names where `make vllm` would put it)."""
    if os.environ.get(VLLM_PYTHON_ENV):
        return os.environ[VLLM_PYTHON_ENV]
    found = next((p for p in vllm_python_candidates() if p.is_file()), None)
    return str(found or vllm_python_candidates()[0])


@dataclass
class ServeConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "base model: a local HF dir or the embedded default"})
    served_model_name: str = field(default="smollm2", metadata={"help": "name the base model is served under"})
    python: str | None = field(default=None, metadata={"help": f"python of the vLLM venv (default: ${VLLM_PYTHON_ENV}, else .venv-vllm/bin/python in the opsd repository, next to opsd's venv, or in the current directory)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=0, metadata={"help": "port; 0 picks a free one"})
    dtype: str = field(default="bfloat16", metadata={"help": "weights/activations dtype on the server (auto | bfloat16 | float32)"})
    max_model_len: int = field(default=4096, metadata={"help": "longest prompt + reply in tokens"})
    enable_lora: bool = field(default=True, metadata={"help": "serve LoRA adapters (loaded at runtime by opsd.serve.adapters)"})
    max_lora_rank: int = field(default=16, metadata={"help": "largest adapter rank the server accepts (8, 16, 32, 64, ...)"})
    max_loras: int = field(default=2, metadata={"help": "adapters active in one batch (old and new during a swap)"})
    kv_cache_gb: float = field(default=1.0, metadata={"help": "CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)"})
    max_num_seqs: int = field(default=64, metadata={"help": "sequences decoded together"})
    startup_timeout: float = field(default=600.0, metadata={"help": "seconds to wait for /health before giving up"})
    log: str | None = field(default=None, metadata={"help": "server log file (default: a temp file, path in Server.log_path)"})
    extra_args: list[str] = field(default_factory=list, metadata={"help": "more api_server arguments, passed as given"})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ValueError(f"dtype: expected auto, bfloat16, float32 or float16, got {self.dtype!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: expected 0 (pick a free one) or a port number, got {self.port}")
        if self.max_lora_rank not in (1, 8, 16, 32, 64, 128, 256, 320, 512):
            raise ValueError(f"max_lora_rank: vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320 or 512, got {self.max_lora_rank}")
        if self.kv_cache_gb <= 0 or self.max_model_len < 16 or self.max_num_seqs < 1 or self.max_loras < 1:
            raise ValueError("kv_cache_gb must be > 0, max_model_len >= 16, max_num_seqs and max_loras >= 1")
        if self.startup_timeout <= 0:
            raise ValueError(f"startup_timeout: expected seconds > 0, got {self.startup_timeout}")
