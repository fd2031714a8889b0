"""`opsd eval --logs`: before vs after on the critiqued errors of logs, teacher-forced (tiny random models)."""
from __future__ import annotations

import json

import pytest

from opsd.eval.config import EvalConfig
from opsd.eval.run import teacher_forced_all
from opsd.render import render
from tests.conftest import CRITIQUES, TRAJECTORIES, save_tiny


def _halves(tmp_path):
    """sample_openai and its critiques, each split over two files (several inputs, as a user has them)."""
    lines = TRAJECTORIES.read_text().splitlines(keepends=True)
    crits = CRITIQUES.read_text().splitlines(keepends=True)
    paths = []
    for name, rows in (("a.jsonl", lines[:4]), ("b.jsonl", lines[4:]), ("ca.jsonl", crits[:3]), ("cb.jsonl", crits[3:])):
        (tmp_path / name).write_text("".join(rows))
        paths.append(str(tmp_path / name))
    return paths


@pytest.fixture(scope="module")
def after_dir(tmp_path_factory, smol_tok):
    return save_tiny(tmp_path_factory.mktemp("after") / "model", smol_tok, seed=5)


def test_cli_eval_logs_writes_the_report(tiny_model_dir, after_dir, tmp_path, capsys):
    from opsd.cli import main

    a, b, ca, cb = _halves(tmp_path)
    out = tmp_path / "report"
    rc = main(["eval", "--logs", a, b, "--critiques", ca, cb, "--before", str(tiny_model_dir), "--after", str(after_dir),
               "--out", str(out), "--device", "cpu", "--precision", "fp32", "--bootstrap", "200"])
    printed = capsys.readouterr().out
    assert rc == 0 and "Verdicts (n=6 critiqued errors of 8 held-out logs" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == "logs" and rep["data"]["verdicts"] == {"error": 6, "ok": 2, "failed": 0, "not_critiqued": 0}
    tf, cats = rep["teacher_forced"], rep["per_category"]
    assert tf["n_examples"] == 6 and cats["all"]["n"] == 6 and sum(c["n"] for k, c in cats.items() if k != "all") == 6
    paired = cats["all"]["paired"]
    per = tf["per_example"]
    assert paired["diff"] == pytest.approx(sum(p["after"] - p["before"] for p in per) / 6)
    assert paired["ci95"][0] <= paired["diff"] <= paired["ci95"][1] and 0 < paired["p"] <= 1
    assert cats["all"]["lowered"]["count"] == sum(p["after"] < p["before"] for p in per)
    assert cats["all"]["hint_effect"]["diff"] == pytest.approx(sum(p["hinted"] - p["before"] for p in per) / 6)
    # two different models: drift on every assistant token outside the error spans, and on the 2 logs passed
    assert rep["drift"]["kl_outside_error_spans"]["n"] == 6 and rep["drift"]["kl_critic_ok_replies"]["n"] == 2
    assert rep["drift"]["kl_critic_ok_replies"]["mean"] > 1e-4
    assert [v["key"] for v in rep["verdicts"]] == ["error_tokens_fall", "drift_outside_errors", "drift_critic_ok"]
    md = (out / "report.md").read_text()
    assert md.index("Verdicts") < md.index("## Error spans") < md.index("## Drift")
    assert (out / "error_span_logprob.png").stat().st_size > 0


def test_the_same_model_before_and_after_changes_nothing(tiny_model_dir, tmp_path):
    from opsd.eval.logs import main

    rep = main(EvalConfig(before=str(tiny_model_dir), after=str(tiny_model_dir), logs=[str(TRAJECTORIES)],
                          critiques=[str(CRITIQUES)], out=str(tmp_path), device="cpu", precision="fp32",
                          bootstrap=200), log=lambda *_: None)
    allc = rep["per_category"]["all"]
    assert allc["paired"]["diff"] == 0 and allc["lowered"]["count"] == 0
    assert rep["drift"]["kl_outside_error_spans"]["mean"] == pytest.approx(0, abs=1e-7)
    assert rep["verdicts"][0]["verdict"] == "not met"


def test_logs_are_scored_on_every_assistant_message(tiny_model_dir, after_dir, trajectories, critiques):
    """--logs drift covers every assistant turn of a log (multi-turn-ok has 4), not only the last reply."""
    from opsd.io.models import load

    a, tok = load(str(tiny_model_dir), device="cpu")
    b, _ = load(str(after_dir), device="cpu")
    ok = [t for t in trajectories if t.id == "multi-turn-ok"]
    cfg = EvalConfig(bootstrap=200)
    _, last, _ = teacher_forced_all(a, b, tok, ok, critiques, cfg, gt_calls=False)
    _, every, _ = teacher_forced_all(a, b, tok, ok, critiques, cfg, gt_calls=False, all_turns=True)
    r = render(ok[0], tok)
    bodies = [r.body_spans[i] for i, m in enumerate(ok[0].messages) if m["role"] == "assistant"]
    assert every["kl_critic_ok_replies"]["n_tokens"] == sum(e - s for s, e in bodies)
    assert last["kl_critic_ok_replies"]["n_tokens"] == bodies[-1][1] - bodies[-1][0] < sum(e - s for s, e in bodies)


def test_without_critiques_the_logs_are_critiqued(tiny_model_dir, tmp_path, capsys):
    from opsd.cli import main

    rc = main(["eval", "--logs", str(TRAJECTORIES), "--critic.name", "schema", "--before", str(tiny_model_dir),
               "--after", str(tiny_model_dir), "--out", str(tmp_path), "--device", "cpu", "--bootstrap", "200"])
    assert rc == 0
    made = [json.loads(x) for x in (tmp_path / "critiques.jsonl").read_text().splitlines()]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert len(made) == 8 and rep["teacher_forced"]["n_examples"] >= 4


def test_critiques_of_other_logs_are_a_clear_error(tiny_model_dir, tmp_path, capsys):
    from opsd.cli import main

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}]}) + "\n")
    rc = main(["eval", "--logs", str(other), "--critiques", str(CRITIQUES), "--before", str(tiny_model_dir),
               "--after", str(tiny_model_dir), "--out", str(tmp_path / "r")])
    assert rc == 1 and "none of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only used with --logs"):
        EvalConfig(critiques=[str(CRITIQUES)])
