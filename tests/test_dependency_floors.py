"""pyproject's floors for torch and transformers are at least the first releases with the APIs opsd calls.

How they were found (2026-12-07): older wheels downloaded with `pip download --no-deps` and read, and the
tests run against transformers installed into a side folder on PYTHONPATH:
- transformers: `opsd.rollout.hf.PreallocatedLayer` subclasses `cache_utils.DynamicLayer` and relies on its
  `is_initialized` (4.57; 4.56.2 fails tests/rollout/test_rollout.py::test_preallocated_layer_matches_dynamic_layer
  with AttributeError; 4.57.0 was yanked); 4.57.1 passes tests/rollout, tests/train/test_shared_prefix.py,
  test_teacher_reuse.py and test_train_loop.py. `from_pretrained(dtype=...)` needs 4.56.
- torch: fused AdamW on CPU (`opsd.train.run.start`) needs "cpu" in `_get_fused_kernels_supported_devices` (2.4.0,
  not 2.3.1); `opsd.io.models.bf16_supported` calls `torch.cpu._is_avx512_bf16_supported` and
  `_is_amx_tile_supported` (2.5.0, not 2.4.0).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

NEEDED = {"torch": (2, 5), "transformers": (4, 57, 1)}


def floors(path: Path = Path(__file__).resolve().parents[1] / "pyproject.toml") -> dict[str, tuple[int, ...]]:
    deps = tomllib.loads(path.read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", d)
        if m:
            out[m.group(1).lower()] = tuple(int(x) for x in m.group(2).split("."))
    return out


def test_floors_cover_the_apis_the_code_uses():
    got = floors()
    for name, need in NEEDED.items():
        assert name in got, f"{name}: no >= floor in pyproject.toml"
        assert got[name] >= need, f"{name}>={'.'.join(map(str, got[name]))} allows versions without what opsd uses"
