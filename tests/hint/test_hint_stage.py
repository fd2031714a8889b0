"""`opsd hint`: examples.jsonl rows, their hint effect against direct scoring, and the per-category table."""
from __future__ import annotations

import json
import math

import pytest

from opsd.hint.config import HintConfig
from opsd.hint.run import category_effects, format_table, main
from opsd.train.scoring import span_logprobs
from tests.conftest import CRITIQUES, TRAJECTORIES


def test_category_effects_known_values():
    rows = [{"category": "unknown_tool", "hint_effect": -1.0, "hint_effect_first": -2.0},
            {"category": "unknown_tool", "hint_effect": -3.0, "hint_effect_first": 0.0},
            {"category": "type_mismatch", "hint_effect": 0.5, "hint_effect_first": 0.25}]
    table = {c.category: c for c in category_effects(rows)}
    u = table["unknown_tool"]
    assert (u.n, u.mean, u.lowered, u.first_token_mean) == (2, -2.0, 2, -1.0)
    half = 1.96 * math.sqrt(2.0) / math.sqrt(2)  # sd of (-1, -3) is sqrt(2)
    assert u.ci95 == pytest.approx((-2.0 - half, -2.0 + half))
    t = table["type_mismatch"]
    assert (t.n, t.mean, t.lowered, t.ci95) == (1, 0.5, 0, (0.5, 0.5))
    assert table["all"].n == 3 and table["all"].mean == pytest.approx(-3.5 / 3) and table["all"].lowered == 2
    assert [c.category for c in category_effects(rows)] == ["unknown_tool", "type_mismatch", "all"]


def test_config_rejects_bad_values():
    for bad in ({"placement": "footer"}, {"span": "all"}, {"placement": "inline", "span": "step"}, {"batch_size": 0},
                {"precision": "fp16"}):
        with pytest.raises(ValueError):
            HintConfig(**bad)


@pytest.mark.slow
def test_hint_stage_on_the_real_model(tmp_path, smol_model):
    report = main(HintConfig(trajectories=str(TRAJECTORIES), critiques=str(CRITIQUES), out=str(tmp_path), precision="fp32",
                             device="cpu"))
    rows = [json.loads(x) for x in (tmp_path / "examples.jsonl").read_text().splitlines()]
    assert report.examples == len(rows) == 6 and report.skipped == {"verdict_ok": 2}
    per_cat = [c for c in report.categories if c.category != "all"]
    assert sum(c.n for c in per_cat) == 6
    # every row's hint effect equals direct scoring of the quote tokens with and without the hint
    model, _ = smol_model
    for r in rows:
        s = span_logprobs(model, [r["student_ids"]], [tuple(r["student_span"])]).token_logprobs[0]
        t = span_logprobs(model, [r["teacher_ids"]], [tuple(r["teacher_span"])]).token_logprobs[0]
        q0, q1 = r["meta"]["quote_span"]
        lo, hi = q0 - r["student_span"][0], q1 - r["student_span"][0]
        assert r["hint_effect"] == pytest.approx((t - s)[lo:hi].mean().item(), abs=1e-4)
        assert r["hint_effect_first"] == pytest.approx((t - s)[lo].item(), abs=1e-4)
    saved = json.loads((tmp_path / "hint_effects.json").read_text())
    assert saved["examples"] == 6 and saved["categories"][-1]["category"] == "all"
    assert "| all | 6 |" in (tmp_path / "hint_effects.md").read_text() == format_table(report) + "\n"
