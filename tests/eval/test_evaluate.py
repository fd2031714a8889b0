"""Evaluation end to end: teacher-forced metrics, collateral on ground-truth calls, `opsd eval` and the demo/loop
commands (tiny random models for plumbing, the embedded model for behaviour)."""
import copy
import json
import subprocess
import sys

import pytest

from opsd.eval.run import (
    EvalConfig,
    gt_call,
    gt_call_collateral,
    teacher_forced_all,
)
from opsd.types import Critique, Trajectory
from tests.conftest import DATA, ROOT


def test_gt_call_uses_first_value_and_omits_optional():
    calls = gt_call([{"f": {"a": [10], "b": ["", "x"], "c": ["units", ""],
                            "d": [{"math": [90], "art": ["", 3]}], "e": [[{"k": ["v", "w"]}]]}}])
    assert calls[0]["function"]["name"] == "f"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 10, "c": "units", "d": {"math": 90},
                                                             "e": [{"k": "v"}]}


def test_eval_config_checks_its_fields():
    with pytest.raises(ValueError, match="precision"):
        EvalConfig(precision="fp16")
    with pytest.raises(ValueError, match="limit"):
        EvalConfig(limit=0)
    with pytest.raises(ValueError, match="bootstrap"):
        EvalConfig(bootstrap=10)
    assert EvalConfig().precision == "auto"


@pytest.mark.slow
def test_same_model_before_and_after_gives_zero_change(smol_model):
    from opsd.io.trajectories import load_trajectories

    model, tok = smol_model
    trajs = load_trajectories(DATA / "sample_openai.jsonl")
    crits = [Critique.from_dict(json.loads(x)) for x in (DATA / "sample_critiques.jsonl").read_text().splitlines() if x.strip()]
    cfg = EvalConfig()
    tf, col, _ = teacher_forced_all(model, model, tok, trajs, crits, cfg, gt_calls=False)
    assert tf["n_examples"] >= 4
    assert tf["error_span_logprob"]["delta"] == pytest.approx(0, abs=1e-5)
    assert tf["fraction_lowered"] == 0.0
    # the hinted teacher is a different context, so it differs from the student
    assert abs(tf["hint_effect"]) > 1e-3
    assert tf["gap_closed"] == pytest.approx(0, abs=1e-4)
    for p in tf["per_example"]:
        assert p["before"] <= 0 and p["hinted"] <= 0 and p["before"] == p["after"]
    assert col["kl_outside_error_spans"]["n_tokens"] > 0 and col["kl_critic_ok_replies"]["n_tokens"] > 0
    assert col["kl_outside_error_spans"]["mean"] == pytest.approx(0, abs=1e-6)
    assert col["kl_critic_ok_replies"]["mean"] == pytest.approx(0, abs=1e-6)
    assert tf["error_span_paired"]["diff"] == pytest.approx(0, abs=1e-5) and tf["lowered"]["count"] == 0

    # B is scored without the hinted replies (only A's are used): with the same weights in another object (other
    # batch shapes), its numbers still line up with A's, reply by reply (to rounding; the same object: exactly)
    copy_tf, copy_col, _ = teacher_forced_all(model, copy.deepcopy(model), tok, trajs, crits, cfg, gt_calls=False)
    assert len(copy_tf["per_example"]) == len(tf["per_example"])
    for p, q in zip(copy_tf["per_example"], tf["per_example"]):
        assert p["trajectory_id"] == q["trajectory_id"]
        assert p["before"] == q["before"] and p["hinted"] == q["hinted"]  # A's pass is the same either way
        assert p["after"] == pytest.approx(p["before"], abs=1e-4)
        assert p["first_after"] == pytest.approx(p["first_before"], abs=1e-4)
    for key in ("kl_outside_error_spans", "kl_critic_ok_replies"):
        assert copy_col[key]["n_tokens"] == col[key]["n_tokens"] and copy_col[key]["mean"] == pytest.approx(0, abs=1e-5)


def test_eval_rollout_batch_is_from_free_memory_by_default():
    assert EvalConfig().batch_size == 0
    EvalConfig(batch_size=16)
    with pytest.raises(ValueError, match="batch_size >= 0"):
        EvalConfig(batch_size=-1)


def _bfcl_trajs(n=6):
    from opsd.io.tasks import load_tasks

    out = []
    for t in load_tasks("bfcl:multiple,parallel_multiple:heldout", limit=n):
        msg = {"role": "assistant", "content": "<tool_call>\n{}", "token_ids": [0]}
        out.append(Trajectory(t.id + "#s0", t.messages + [msg], t.tools,
                              {"task_id": t.id, "ground_truth": t.ground_truth, **t.meta}))
    return out


@pytest.mark.slow
def test_gt_call_collateral_same_model_is_zero_and_never_empty(smol_model):
    model, tok = smol_model
    trajs = _bfcl_trajs()
    prefill = tok("<tool_call>\n", add_special_tokens=False)["input_ids"]
    per, summary = gt_call_collateral(model, model, tok, trajs, EvalConfig(bootstrap=200), prefill)
    assert summary["n"] == len(trajs) == len(per) and summary["n_tokens"] > 20 * len(trajs)
    assert summary["kl_per_token"]["mean"] == pytest.approx(0, abs=1e-6)
    assert summary["logprob_per_token"]["diff"] == pytest.approx(0, abs=1e-6)
    # the base model finds a correct call fairly likely: per-token log-prob well above uniform (-10.8)
    assert -3 < summary["logprob_per_token"]["before"] < 0


def test_gt_call_collateral_sees_a_different_model(tiny_model_dir, smol_tokenizer):
    from opsd.io.models import load
    from tests.conftest import save_tiny

    a, tok = load(str(tiny_model_dir), device="cpu")
    b, _ = load(str(save_tiny(tiny_model_dir.parent / "tiny-b", smol_tokenizer, seed=1)), device="cpu")
    trajs = _bfcl_trajs(4)
    prefill = tok("<tool_call>\n", add_special_tokens=False)["input_ids"]
    per, summary = gt_call_collateral(a, b, tok, trajs, EvalConfig(bootstrap=200), prefill)
    assert summary["n"] == 4 and summary["kl_per_token"]["mean"] > 1e-4
    lo, hi = summary["kl_per_token"]["ci95"]
    assert 0 < lo <= summary["kl_per_token"]["mean"] <= hi
    # the forced prefill is not scored: the span starts after it
    one, _ = gt_call_collateral(a, b, tok, trajs[:1], EvalConfig(bootstrap=200), [])
    assert one[trajs[0].meta["task_id"]]["n_tokens"] == per[trajs[0].meta["task_id"]]["n_tokens"] + len(prefill)


def test_eval_main_writes_per_task_outcomes_that_recompute(tiny_model_dir, smol_tokenizer, tmp_path):
    """`opsd eval` on two different tiny models: per-task outcomes for every task, verdicts first in report.md,
    and scripts/recompute_report.py reproduces every number from report.json."""
    from opsd.critique.config import CriticConfig
    from opsd.critique.outcomes import reply_outcomes
    from opsd.critique.run import critique_fn
    from opsd.eval.run import main
    from tests.conftest import save_tiny

    other = save_tiny(tmp_path / "after", smol_tokenizer, seed=3)
    cfg = EvalConfig(before=str(tiny_model_dir), after=str(other), tasks="bfcl:multiple,parallel_multiple:heldout",
                     out=str(tmp_path / "report"), limit=6, max_new_tokens=8, prefill="<tool_call>\n",
                     device="cpu", precision="fp32", bootstrap=200)
    rep = main(cfg, critique_fn(CriticConfig(name="schema+reference"), progress=False), outcome_fn=reply_outcomes,
               log=lambda *_: None)
    assert rep["version"] == 2 and len(rep["per_task"]) == 6 == rep["comparison"]["n"]
    assert set(rep["data"]["by_category"]) == {"multiple", "parallel_multiple"}
    assert rep["collateral"]["gt_call"]["n"] == 6 and rep["collateral"]["gt_call"]["kl_per_token"]["mean"] > 0
    assert [v["key"] for v in rep["verdicts"]] == ["no_declared_tool_falls", "no_collapse",
                                                    "official_accuracy_holds", "gt_call_kl"]
    for t in rep["per_task"]:
        assert t["before"]["reply"] and t["after"]["reply"] and t["before"]["errors"] is not None
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("Verdicts") < md.index("## Outcomes")
    assert (tmp_path / "report" / "paired_differences.png").exists()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "recompute_report.py"),
                        str(tmp_path / "report" / "report.json")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and " 0 mismatches" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_error_span_logprobs_match_direct_scoring(smol_model):
    """The merged pass reads the same numbers as scoring each HintedExample on its own."""
    from opsd.hint.build import build_examples
    from opsd.io.trajectories import load_trajectories
    from opsd.train.scoring import span_logprobs

    model, tok = smol_model
    trajs = load_trajectories(DATA / "sample_openai.jsonl")
    crits = [Critique.from_dict(json.loads(x)) for x in (DATA / "sample_critiques.jsonl").read_text().splitlines() if x.strip()]
    tf, _, _ = teacher_forced_all(model, model, tok, trajs, crits, EvalConfig(), gt_calls=False)
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
