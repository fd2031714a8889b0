"""The critique stage: one CriticConfig / CritiqueConfig (checked fields), build_critic, main(cfg),
critique_fn for eval/demo/loop, and the GKD+RL critic_reward."""
from __future__ import annotations

import dataclasses
import json
import typing

import pytest

import opsd_critic
import opsd_critic.runner
from opsd_critic.base import MIN_RULE_HINT_TOKENS
from opsd_critic.fake_server import OK_REPLY, Reply, Status
from opsd_critic.llm_config import MIN_HINT_TOKENS, LLMConfig
from opsd.critique import config as config_mod
from opsd.critique.config import CriticConfig, CritiqueConfig
from opsd.critique.run import (
    CritiqueRunError,
    build_critic,
    critic_reward,
    critique_fn,
    main,
)
from opsd.io.records import read_jsonl
from opsd.types import Trajectory
from tests.conftest import DATA
from tests.critic.conftest import FAKE_KEY

SAMPLE = str(DATA / "sample_openai.jsonl")


def test_every_field_has_help_and_a_default():
    for cls in (CriticConfig, CritiqueConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), (cls.__name__, f.name)
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        cls()  # the defaults are valid


def test_names_agree_with_the_critic_package():
    assert config_mod.CRITIC_NAMES == opsd_critic.CRITICS
    assert config_mod.RETRY_FAILED == opsd_critic.runner.RETRY_FAILED
    assert typing.get_args(typing.get_type_hints(CriticConfig)["name"]) == opsd_critic.CRITICS
    assert MIN_HINT_TOKENS >= MIN_RULE_HINT_TOKENS


@pytest.mark.parametrize("kw, field", [
    (dict(name="gpt"), "name:"), (dict(name="llm"), "model:"), (dict(name="schema+llm"), "model:"),
    (dict(base_url="localhost:8000"), "base_url:"), (dict(api_key_env="sk-123"), "api_key_env:"),
    (dict(prompt="/no/such/file.j2"), "prompt:"), (dict(timeout=0), "timeout:"), (dict(backoff=-1), "backoff:"),
    (dict(max_attempts=0), "max_attempts:"), (dict(max_reasks=-1), "max_reasks:"), (dict(max_tokens=0), "max_tokens:"),
    (dict(concurrency=0), "concurrency:"), (dict(max_hint_tokens=8), "max_hint_tokens:"),
    (dict(temperature=-0.5), "temperature:"), (dict(retry_failed="some"), "retry_failed:"),
    (dict(max_transport_failure_share=1.5), "max_transport_failure_share:"),
])
def test_critic_config_names_the_bad_field(kw, field):
    with pytest.raises(ValueError, match=field):
        CriticConfig(**kw)


def test_llm_options_are_written_once():
    """CriticConfig's LLM options are LLMConfig's fields (same default, same help) with LLMConfig's checks, and
    build_critic hands exactly those on (LLMConfig.of): no second copy to drift."""
    llm = {f.name: f for f in dataclasses.fields(LLMConfig)}
    crit = {f.name: f for f in dataclasses.fields(CriticConfig)}
    for name, f in llm.items():
        assert (crit[name].default, crit[name].metadata) == (f.default, f.metadata), name
    cfg = CriticConfig(name="llm", model="m", base_url="http://h:1/v1", timeout=7.0, temperature=0.3, concurrency=3)
    assert dataclasses.asdict(LLMConfig.of(cfg)) == {k: getattr(cfg, k) for k in llm}
    for kw, field in [(dict(temperature=-0.5), "temperature:"), (dict(max_hint_tokens=8), "max_hint_tokens:"),
                      (dict(base_url="http://"), "base_url:"), (dict(model=""), "model:")]:
        with pytest.raises(ValueError, match=field):
            LLMConfig(**{"model": "m", **kw})


@pytest.mark.parametrize("kw, field", [(dict(limit=-1), "limit:"), (dict(limit=0), "limit:"), (dict(out=""), "out:")])
def test_critique_config_names_the_bad_field(kw, field):
    with pytest.raises(ValueError, match=field):
        CritiqueConfig(**kw)


def test_out_must_not_be_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        CritiqueConfig(inputs=[SAMPLE], out=str(tmp_path))


def test_main_critiques_and_limits(tmp_path):
    out = tmp_path / "c.jsonl"
    s = main(CritiqueConfig(inputs=[SAMPLE], out=str(out), limit=3, progress=False))
    assert (s.total, s.new) == (3, 3) and s.error is None
    s = main(CritiqueConfig(inputs=[SAMPLE], out=str(out), progress=False))
    assert (s.total, s.new, s.skipped) == (8, 5, 3) and s.verdicts == {"error": 6, "ok": 2}
    with pytest.raises(ValueError, match="inputs:"):
        main(CritiqueConfig(out=str(out)))


def test_build_critic_for_every_name(monkeypatch, server):
    monkeypatch.setenv("OPSD_TEST_KEY", FAKE_KEY)
    srv = server()
    for name in opsd_critic.CRITICS:
        c = build_critic(CriticConfig(name=name, base_url=srv.base_url, model="m", api_key_env="OPSD_TEST_KEY"))
        assert c.name == name and c.info["name"] == name
    monkeypatch.delenv("OPSD_TEST_KEY")
    with pytest.raises(ValueError, match="api_key_env: no API key"):
        build_critic(CriticConfig(name="llm", base_url=srv.base_url, model="m", api_key_env="OPSD_TEST_KEY"))


def test_critique_fn_returns_one_critique_per_trajectory_in_order(samples, tmp_path):
    trajs = list(samples.values())[::-1]
    fn = critique_fn(CriticConfig(name="schema"), progress=False, echo=lambda s: None)
    got = fn(trajs, tmp_path / "c.jsonl")
    assert [c.trajectory_id for c in got] == [t.id for t in trajs]
    assert fn(trajs, tmp_path / "c.jsonl") == got  # resumed: read back, same critiques


def test_critique_fn_raises_when_the_run_failed(samples, server, monkeypatch, tmp_path):
    monkeypatch.setenv("OPSD_TEST_KEY", FAKE_KEY)
    srv = server([Status(503)] * 100)
    cfg = CriticConfig(name="llm", base_url=srv.base_url, model="m", api_key_env="OPSD_TEST_KEY", max_attempts=1,
                       backoff=0.01)
    with pytest.raises(CritiqueRunError, match="every critique of this run failed"):
        critique_fn(cfg, progress=False, echo=lambda s: None)([samples["weather-ok"]], tmp_path / "c.jsonl")
    srv.script.clear()
    got = critique_fn(cfg, progress=False, echo=lambda s: None)([samples["weather-ok"]], tmp_path / "c.jsonl")
    assert [c.verdict for c in got] == ["ok"]  # the retry superseded the failure


def test_critic_reward(samples):
    cut = {t.id: Trajectory(t.id, t.messages[:i + 1], t.tools, t.meta) for t in samples.values()
           for i in [next((i for i, m in enumerate(t.messages) if m.get("tool_calls")), None)] if i is not None}
    for reward in (critic_reward(CriticConfig(name="schema")), critic_reward(opsd_critic.make_critic("schema"))):
        rewards = dict(zip(cut, reward(list(cut.values()))))
        assert rewards["weather-ok"] == 1.0 and rewards["weather-unknown-tool"] == 0.0
        assert rewards["flights-missing-arg"] == 0.0
        assert reward([samples["weather-ok"]]) == [0.0]  # its last message is plain text: no call
    with pytest.raises(ValueError, match="rule critic"):
        critic_reward(CriticConfig(name="llm", model="m"))


# ---- schema+llm: a rule critic cross-checks the LLM's "ok"

def test_schema_overrules_an_llm_ok_and_records_the_disagreement(samples, server, monkeypatch, tmp_path):
    monkeypatch.setenv("OPSD_TEST_KEY", FAKE_KEY)
    srv = server(responder=lambda body: Reply(OK_REPLY, usage={"prompt_tokens": 7, "completion_tokens": 3,
                                                                "total_tokens": 10}))
    cfg = CriticConfig(name="schema+llm", base_url=srv.base_url, model="m", api_key_env="OPSD_TEST_KEY")
    got = critique_fn(cfg, progress=False, echo=lambda s: None)([samples["weather-enum"], samples["weather-ok"]],
                                                                 tmp_path / "c.jsonl")
    enum, ok = got
    assert (enum.verdict, enum.category, enum.quote) == ("error", "enum_violation", "kelvin")
    assert enum.disagreement == {"overruled": {"name": "llm", "verdict": "ok"}, "by": "schema"}
    assert enum.usage["total_tokens"] == 10 and enum.critic["name"] == "schema+llm"
    assert ok.verdict == "ok" and ok.disagreement is None
    assert [r["disagreement"] for r in read_jsonl(tmp_path / "c.jsonl")] in ([enum.disagreement, None],
                                                                            [None, enum.disagreement])
    for r in read_jsonl(tmp_path / "c.jsonl"):  # the LLM's raw reply is kept, also where schema overruled it
        assert r["replies"] == [{"round": 0, "finish_reason": "stop", "text": OK_REPLY}], r["trajectory_id"]


def test_an_llm_error_stands_under_schema_plus_llm(samples, server, monkeypatch, tmp_path):
    monkeypatch.setenv("OPSD_TEST_KEY", FAKE_KEY)
    reply = json.dumps({"verdict": "error", "step": 2, "quote": "Oslo", "hint": "Ask which city first.",
                        "category": "wrong_value"})
    srv = server([Reply(reply)])
    cfg = CriticConfig(name="schema+llm", base_url=srv.base_url, model="m", api_key_env="OPSD_TEST_KEY")
    (c,) = critique_fn(cfg, progress=False, echo=lambda s: None)([samples["weather-enum"]], tmp_path / "c.jsonl")
    assert (c.verdict, c.quote, c.disagreement) == ("error", "Oslo", None)


def test_the_summary_counts_the_rejected_input_lines(tmp_path):
    """`opsd critique --rejects` used to print a summary without the lines it skipped."""
    from opsd_critic.runner import format_summary

    logs = tmp_path / "logs.jsonl"
    good = (DATA / "sample_openai.jsonl").read_text().splitlines()[:2]
    logs.write_text("\n".join([good[0], '{"messages": "not a list"}', good[1], "{broken json"]) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    s = main(CritiqueConfig(inputs=[str(logs)], out=str(tmp_path / "c.jsonl"), rejects=str(rejects), progress=False,
                            critic=CriticConfig(name="schema")))
    assert s.total == 2 and s.rejected == 2 == len(rejects.read_text().splitlines())
    text = format_summary(s)
    assert "rejected  2 invalid input record(s)" in text and str(rejects) in text
