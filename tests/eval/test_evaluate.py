"""Evaluation metrics, the report, and the demo/loop commands end to end (tiny model for plumbing)."""
import json
import subprocess
import sys

import pytest

from opsd.eval.run import (
    EvalConfig,
    behaviour_stats,
    gt_call,
    teacher_forced_and_drift,
    wilson,
)
from opsd.types import Critique, Trajectory
from tests.conftest import DATA, ROOT


def test_wilson_interval_known_values():
    lo, hi = wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert wilson(0, 0) == (0.0, 0.0)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and 0.15 < hi < 0.17


def test_gt_call_uses_first_value_and_omits_optional():
    calls = gt_call([{"f": {"a": [10], "b": ["", "x"], "c": ["units", ""]}}])
    assert calls[0]["function"]["name"] == "f"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 10, "c": "units"}


def test_behaviour_stats_counts_each_trajectory_once():
    trajs = [Trajectory(f"t{i}", [{"role": "user", "content": "q"}], meta={"parse_error": "x" if i < 2 else None})
             for i in range(5)]
    crits = [Critique("t0", "error", 1, "q", "h", "unknown_tool"), Critique("t1", "error", 1, "q", "h", "unparsable_call"),
             Critique("t2", "ok"), Critique("t3", "failed", error="boom")]  # t4: no critique at all
    s = behaviour_stats(trajs, crits)
    assert s["n"] == 5 and s["accuracy"]["count"] == 1 and s["critique_failed"] == 2
    assert s["no_parseable_call"]["count"] == 2
    assert s["categories"]["unknown_tool"]["rate"] == pytest.approx(0.2)


@pytest.mark.slow
def test_same_model_before_and_after_gives_zero_change(smol_model):
    from opsd.io.trajectories import load_trajectories

    model, tok = smol_model
    trajs = load_trajectories(DATA / "sample_openai.jsonl")
    crits = [Critique.from_dict(json.loads(x)) for x in (DATA / "sample_critiques.jsonl").read_text().splitlines() if x.strip()]
    cfg = EvalConfig()
    tf, col = teacher_forced_and_drift(model, model, tok, trajs, crits, cfg)
    assert tf["n_examples"] >= 4
    assert tf["error_span_logprob"]["delta"] == pytest.approx(0, abs=1e-5)
    assert tf["fraction_lowered"] == 0.0
    # the hinted teacher is a different context, so it differs from the student
    assert abs(tf["hint_effect"]) > 1e-3
    assert tf["gap_closed"] == pytest.approx(0, abs=1e-4)
    for p in tf["per_example"]:
        assert p["before"] <= 0 and p["hinted"] <= 0 and p["before"] == p["after"]
    assert col["kl_outside_error_spans"]["n_tokens"] > 0 and col["kl_clean_trajectories"]["n_tokens"] > 0
    assert col["kl_outside_error_spans"]["mean"] == pytest.approx(0, abs=1e-6)
    assert col["kl_clean_trajectories"]["mean"] == pytest.approx(0, abs=1e-6)


def test_error_span_logprobs_match_direct_scoring(smol_model):
    """The merged pass reads the same numbers as scoring each HintedExample on its own."""
    from opsd.hint.build import build_examples
    from opsd.io.trajectories import load_trajectories
    from opsd.train.scoring import span_logprobs

    model, tok = smol_model
    trajs = load_trajectories(DATA / "sample_openai.jsonl")
    crits = [Critique.from_dict(json.loads(x)) for x in (DATA / "sample_critiques.jsonl").read_text().splitlines() if x.strip()]
    tf, _ = teacher_forced_and_drift(model, model, tok, trajs, crits, EvalConfig())
    exs, _ = build_examples(trajs, crits, tok)
    direct = span_logprobs(model, [e.student_ids for e in exs], [e.student_span for e in exs]).token_logprobs
    hinted = span_logprobs(model, [e.teacher_ids for e in exs], [e.teacher_span for e in exs]).token_logprobs
    by_id = {p["trajectory_id"]: p for p in tf["per_example"]}
    for e, d, h in zip(exs, direct, hinted):
        p = by_id[e.meta["trajectory_id"]]
        assert p["before"] == pytest.approx(d.mean().item(), abs=1e-4)
        assert p["first_before"] == pytest.approx(d[0].item(), abs=1e-4)
        assert p["hinted"] == pytest.approx(h.mean().item(), abs=1e-4)


def _opsd(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "opsd.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_demo_end_to_end_plumbing(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    r = _opsd("demo", "--model", str(tiny_model_dir), "--prefill", "<tool_call>\\n", "--train-limit", "6",
              "--eval-limit", "4", "--max-new-tokens", "8", "--epochs", "1", "--min-hint-effect=-inf", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((out / "rollouts").glob("train-*.jsonl"))) == 1
    for sub in ("critiques/train.jsonl", "model/config.json", "metrics.jsonl",
                "report/report.json", "report/report.md", "report/category_rates.png"):
        assert (out / sub).exists(), sub
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["version"] == 1 and rep["behaviour"]["before"]["n"] == 4
    assert "teacher_forced" in rep and "collateral" in rep
    assert "| metric (held-out, n=4) | before | after |" in r.stdout
    # rerun resumes: nothing is rolled out or critiqued twice
    r2 = _opsd("demo", "--model", str(tiny_model_dir), "--prefill", "<tool_call>\\n", "--train-limit", "6",
               "--eval-limit", "4", "--max-new-tokens", "8", "--epochs", "1", "--min-hint-effect=-inf", "--out", str(out))
    assert r2.returncode == 0, r2.stderr[-3000:]
    (rollouts,) = (out / "rollouts").glob("train-*.jsonl")
    lines = rollouts.read_text().splitlines()
    assert len(lines) == 6 and len({json.loads(x)["id"] for x in lines}) == 6
    assert len((out / "critiques" / "train.jsonl").read_text().splitlines()) == 6


def test_loop_keeps_every_round(tiny_model_dir, tmp_path):
    out = tmp_path / "loop"
    r = _opsd("loop", "--rounds", "2", "--model", str(tiny_model_dir), "--prefill", "<tool_call>\\n", "--limit", "3",
              "--max-new-tokens", "6", "--epochs", "1", "--min-hint-effect=-inf", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    hist = json.loads((out / "loop.json").read_text())
    assert [h["round"] for h in hist] == [0, 1]
    assert hist[1]["student"] == hist[0]["trained_model"]
    for k in (0, 1):
        assert (out / f"round_{k}" / "rollouts.jsonl").exists() and (out / f"round_{k}" / "critiques.jsonl").exists()
