"""compare's gain-against-forgetting table and plot, and the pooling over seeds (synthetic results)."""
from __future__ import annotations

import pytest

from opsd.eval import stats
from opsd.pipelines.compare import METHODS, CompareConfig
from opsd.pipelines.compare_seeds import format_tradeoff, pool_seeds, tradeoff_plot, write_seeds


def _result(pairs: dict[str, list[tuple[bool, bool]]], kl: dict[str, float]) -> dict:
    rows = {}
    for m, ps in pairs.items():
        acc = stats.paired_binary([b for b, _ in ps], [a for _, a in ps], n_boot=200)
        rows[m] = {"status": "trained", "vs_base": {"official_accuracy": acc}, "accuracy_pairs": [list(p) for p in ps],
                   "forgetting": {"kl_per_token": stats.ratio_of_sums([kl[m] * 10] * 4, [10] * 4, n_boot=200)}}
    rows["rft"] = {"status": "no training data", "reason": "no reply passed the critic"}
    return {"heldout": {"n": len(next(iter(pairs.values()))), "rows": rows}}


def test_pooling_pairs_every_seed_and_task():
    a = _result({"opsd": [(False, True)] * 6 + [(False, False)] * 4, "sft-gt": [(False, True)] * 2 + [(False, False)] * 8},
                {"opsd": 0.01, "sft-gt": 0.2})
    b = _result({"opsd": [(False, True)] * 3 + [(True, False)] * 1 + [(False, False)] * 6,
                 "sft-gt": [(False, False)] * 10}, {"opsd": 0.02, "sft-gt": 0.3})
    pooled = pool_seeds([0, 1], [a, b], bootstrap=200)
    assert set(pooled) == {"opsd", "sft-gt"}  # an untrained method has nothing to pool
    o = pooled["opsd"]["pooled"]
    assert o["n"] == 20 and o["before"]["count"] == 1 and o["after"]["count"] == 9
    assert o["diff"] == pytest.approx(8 / 20)
    assert pooled["opsd"]["per_seed"][1]["diff"] == pytest.approx(0.2)
    assert pooled["sft-gt"]["forgetting_per_seed"] == pytest.approx([0.2, 0.3])


def test_tradeoff_table_plot_and_seeds_files(tmp_path):
    a = _result({"opsd": [(False, True)] * 6 + [(False, False)] * 4}, {"opsd": 0.01})
    table = format_tradeoff(a)
    assert "| opsd | +60.0 [" in table and "0.0100" in table and "rft" not in table
    assert tradeoff_plot(a, tmp_path / "t.png").stat().st_size > 1000
    doc = write_seeds(tmp_path, [3, 4], [a, a], bootstrap=200, echo=lambda s: None)
    assert doc["pooled"]["opsd"]["pooled"]["n"] == 20
    assert "| opsd | +60.0" in (tmp_path / "seeds.md").read_text() and (tmp_path / "seeds.json").exists()


def test_random_span_is_a_method_and_seeds_parse():
    assert "random-span" in METHODS and CompareConfig(seeds="0,1,2").seeds == "0,1,2"
