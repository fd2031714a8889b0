"""bench/curves.py without a model: what the curves are said to show (`shape`, and the BENCHMARKS.md lines drawn
from it), and that each point is its own process unless the very same point was already measured."""
from __future__ import annotations

import pytest

from bench import curves, report_sections


def _row(x: int, **sides) -> dict:
    return {"x": x, "sides": {s: {"step_s": t, "peak_rss_gb": m, "rss_after_load_gb": 0.5} for s, (t, m) in sides.items()}}


def _vocab_result(opsd_rss: list[float], gkd_rss: list[float]) -> dict:
    xs = [49152, 98304, 151936]
    return {"hidden": 576, "axes": {"vocab": [_row(x, opsd=(1.0 + i, o), gkd=(3.0 + i, g))
                                              for i, (x, o, g) in enumerate(zip(xs, opsd_rss, gkd_rss))]}}


# the model state that grows with V: 102,784 new weights x 576 x 16 B (opsd) = 0.882 GB, x 20 B (TRL) = 1.103 GB
OPSD_STATE, TRL_STATE = 102784 * 576 * 16 / 2**30, 102784 * 576 * 20 / 2**30


def test_vocab_shape_separates_model_state_from_what_grows_beyond_it():
    res = _vocab_result([2.0, 2.45, 2.0 + OPSD_STATE + 0.05], [4.0, 7.0, 4.0 + TRL_STATE + 6.0])
    sh = curves.shape(res)["vocab"]
    assert sh["opsd"]["model_state_growth_gb"] == pytest.approx(OPSD_STATE)
    assert sh["gkd"]["model_state_growth_gb"] == pytest.approx(TRL_STATE)
    assert sh["opsd"]["rss_growth_beyond_state_gb"] == pytest.approx(0.05)
    assert sh["gkd"]["rss_growth_beyond_state_gb"] == pytest.approx(6.0)
    assert sh["gkd"]["rss_gb_per_unit"] == pytest.approx((TRL_STATE + 6.0) / 102784 * 10_000)
    assert sh["opsd"]["step_ratio"] == pytest.approx(3.0)
    text = "\n".join(report_sections._slopes("vocab", sh))
    assert "Expected shape" in text and "**holds**" in text and "+6.00 GB" in text


def test_vocab_shape_does_not_hold_when_opsd_grows_like_trl_or_trl_is_not_linear():
    grows = curves.shape(_vocab_result([2.0, 4.0, 2.0 + OPSD_STATE + 5.0], [4.0, 7.0, 4.0 + TRL_STATE + 6.0]))
    assert "**does not hold**" in "\n".join(report_sections._slopes("vocab", grows["vocab"]))
    # GKD flat up to the middle point, then a jump: far off the straight line through the end points
    bent = curves.shape(_vocab_result([2.0, 2.4, 2.0 + OPSD_STATE], [4.0, 4.1, 4.0 + TRL_STATE + 6.0]))
    assert bent["vocab"]["gkd"]["rss_off_line_share"] > 0.4
    assert "**does not hold**" in "\n".join(report_sections._slopes("vocab", bent["vocab"]))


def test_vocab_shape_cannot_tell_without_two_gkd_points():
    res = _vocab_result([2.0, 2.4, 2.9], [4.0, 7.0, 10.0])
    for r in res["axes"]["vocab"][1:]:
        r["sides"]["gkd"] = {"skipped": "predicted 20 GB of logits > free memory"}
    sh = curves.shape(res)["vocab"]
    assert "gkd" not in sh
    assert "cannot tell" in "\n".join(report_sections._slopes("vocab", sh))


def test_seq_shape_reports_growth_per_unit_and_no_state_split():
    rows = [_row(x, opsd=(x / 512, 1.0 + x / 4096)) for x in (512, 1024, 2048, 4096)]
    sh = curves.shape({"hidden": 576, "axes": {"seq": rows}})["seq"]["opsd"]
    assert sh["x"] == [512, 4096] and sh["points"] == 4
    assert sh["rss_gb_per_unit"] == pytest.approx(0.25)  # GB per 1024 tokens
    assert sh["step_s_per_unit"] == pytest.approx(2.0)
    assert sh["rss_off_line_gb"] == pytest.approx(0.0, abs=1e-12)  # exactly linear
    assert "model_state_growth_gb" not in sh


def test_each_point_runs_once_in_its_own_process_and_a_repeated_point_is_reused(monkeypatch):
    calls = []

    def fake_run_child(cmd, *, cwd, out_json):
        calls.append(cmd)
        return ({"times": [2.0, 4.0], "peak_rss_gb": 1.5 + len(calls), "rss_after_load_gb": 0.5},
                {"wall_s": 9.0, "loadavg": [1.0, 1.0, 1.0], "others_cpu": 0.0, "child_cpu_s": 17.0, "loaded": False})

    monkeypatch.setattr(curves, "run_child", fake_run_child)
    memo: dict = {}
    base = dict(curves.BASE)
    a = curves.point("opsd", "m", "bf16", base, 1, memo)
    b = curves.point("opsd", "m", "bf16", dict(base), 1, memo)  # the same point again (seq 1024 = span 32 base)
    c = curves.point("gkd", "m", "bf16", base, 1, memo)
    assert len(calls) == 2 and calls[0][calls[0].index("--side") + 1] == "opsd"
    assert a["step_s"] == 3.0 and b["reused"] and b["peak_rss_gb"] == a["peak_rss_gb"]
    assert c["peak_rss_gb"] != a["peak_rss_gb"]  # its own process's peak, not a running max
