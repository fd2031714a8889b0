"""Credentials never reach an output file or a message (issue 22 item 10): a key in the URL query (`?api-key=`),
in its userinfo (`http://user:KEY@host`) or in the environment. Every file a run leaves is grepped for each key:
loop.json, compare.json, eval and multi-turn report.json, rollout trajectories (meta["server"]) and error lines;
and the repr of every Config that holds a URL, and the messages of server errors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from opsd.critique.config import CriticConfig
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import main as rollout_main
from opsd.types import Critique
from tests.serve.stand_in import StandIn

QUERY_KEY = "qk-QUERY-SECRET-9876543210"
USER_KEY = "uk-USERINFO-SECRET-1234567"
ENV_KEY = "ek-ENV-SECRET-5555555555"
KEYS = (QUERY_KEY, USER_KEY, ENV_KEY)
ENV = "OPSD_TEST_SECRET_KEY"


def urls(root: str = "http://127.0.0.1:9") -> list[str]:
    host = root.split("://", 1)[1]
    return [f"{root}/v1?api-key={QUERY_KEY}", f"http://user:{USER_KEY}@{host}/v1",
            f"http://user:{USER_KEY}@{host}/v1?api-key={QUERY_KEY}"]


def assert_nowhere(folder: Path, *texts: str) -> None:
    for key in KEYS:
        for t in texts:
            assert key not in t, t
        for f in folder.rglob("*"):
            if f.is_file():
                assert key.encode() not in f.read_bytes(), f


def llm_critic(url: str) -> CriticConfig:
    return CriticConfig(name="llm", model="m", base_url=url, api_key_env=ENV)


def test_config_reprs_and_errors_never_show_a_key():
    from opsd.pipelines.loop import LoopConfig

    for url in urls():
        c, r = llm_critic(url), RolloutConfig(backend="completions", base_url=url, api_key_env=ENV)
        assert c.base_url == url and r.base_url == url  # the requests still get the key
        texts = [repr(c), str(c), repr(r), repr(LoopConfig(critic=c)), f"{[c]}"]
        assert all("***" in t for t in texts)
        assert_nowhere(Path("/nonexistent"), *texts)
    with pytest.raises(ValueError) as e:
        CriticConfig(base_url=f"ftp://user:{USER_KEY}@host/v1")
    assert_nowhere(Path("/nonexistent"), str(e.value))


class _EchoingServer(StandIn):
    """A server that rejects every completion and echoes the request's Authorization header and URL back."""

    def _handler(self):
        base = super()._handler()

        class Handler(base):
            def _completion(self, body: dict) -> None:
                if body.get("max_tokens", 0) > 1:
                    return self._error(500, f"rejected {self.headers.get('Authorization')} for {self.path}")
                return super()._completion(body)

        return Handler


def test_completions_rollouts_keep_keys_out_of_meta_error_lines_and_messages(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv(ENV, ENV_KEY)
    kw = dict(tasks="bfcl:simple_python:heldout", limit=2, backend="completions", api_model="smollm2",
              max_new_tokens=16, concurrency=2, timeout=10.0, api_key_env=ENV, prefill="")
    messages = []
    with StandIn(smol_tokenizer) as srv:  # userinfo: answered; the trajectories say which server, masked
        url = urls(srv.root_url)[1]
        out = tmp_path / "ok.jsonl"
        assert rollout_main(RolloutConfig(out=str(out), base_url=url, **kw))["total"] == 2
        from opsd.io.records import read_jsonl

        servers = {r["meta"]["server"] for r in read_jsonl(out)}
        assert servers == {f"http://user:***@127.0.0.1:{srv.port}/v1"}
        for url in (urls(srv.root_url)[0], urls(srv.root_url)[2]):  # a query key: whatever fails says it masked
            try:
                rollout_main(RolloutConfig(out=str(tmp_path / "q.jsonl"), base_url=url, **kw))
            except Exception as e:
                messages.append(f"{type(e).__name__}: {e}")
    with _EchoingServer(smol_tokenizer) as srv:  # the error lines of echoed keys: Bearer (env), Basic (userinfo)
        for name, url, auth in (("env", srv.base_url, "Bearer ***"), ("userinfo", urls(srv.root_url)[1], "Basic ***")):
            s = rollout_main(RolloutConfig(out=str(tmp_path / f"echo_{name}.jsonl"), base_url=url, **kw))
            assert s["errors"] == 2
            assert auth in Path(str(tmp_path / f"echo_{name}.jsonl") + ".errors.jsonl").read_text()
    for url in urls("http://127.0.0.1:9"):  # nothing listens: the server error names the URL, masked
        with pytest.raises(OSError) as e:
            rollout_main(RolloutConfig(out=str(tmp_path / "down.jsonl"), base_url=url, **kw))
        messages.append(str(e.value))
    assert any("***" in m for m in messages)
    assert_nowhere(tmp_path, *messages)


def _ok_critiques(trajs, path):
    return [Critique(t.id, "ok") for t in trajs]


def test_loop_and_compare_json_hold_no_key(tmp_path, monkeypatch):
    """The whole config is dumped into loop.json and compare.json: the critic's base URL is masked there."""
    from opsd.pipelines import compare, loop
    from opsd.pipelines.validation import Validation

    monkeypatch.setenv(ENV, ENV_KEY)
    url = urls()[2]
    val = Validation(1, 0.0, 1.0, 0.0, (0.0, 1.0), (0.0, 1.0))
    monkeypatch.setattr(loop, "validate", lambda *a, **k: val)
    monkeypatch.setattr(loop, "rollout_main", lambda cfg: {})
    monkeypatch.setattr(loop, "load_rollouts", lambda cfg: [])
    monkeypatch.setattr(loop, "critique_fn", lambda cfg, **k: _ok_critiques)
    hist = loop.main(loop.LoopConfig(out=str(tmp_path / "loop"), rounds=1, critic=llm_critic(url), ceiling=False),
                     echo=lambda s: None)
    assert hist["config"]["critic"]["base_url"] == "http://user:***@127.0.0.1:9/v1?api-key=***"
    for name in ("rollout_main", "load_rollouts"):
        monkeypatch.setattr(compare, name, loop.rollout_main if name == "rollout_main" else loop.load_rollouts)
    monkeypatch.setattr(compare, "critique_fn", lambda cfg, **k: _ok_critiques)
    monkeypatch.setattr(compare, "heldout", lambda *a, **k: {"n": 0, "tasks": "", "rows": {}})
    monkeypatch.setattr(compare, "tradeoff_plot", lambda result, path: None)
    cfg = compare.CompareConfig(out=str(tmp_path / "cmp"), methods="opsd", forgetting_prompts=0, critic=llm_critic(url))
    compare.run_one(cfg, echo=lambda s: None)
    assert (tmp_path / "loop" / "loop.json").exists() and (tmp_path / "cmp" / "compare.json").exists()
    assert_nowhere(tmp_path, repr(cfg))


def test_eval_reports_hold_no_key(tiny_model_dir, tmp_path, monkeypatch):
    """The single-turn and the multi-turn report.json dump the eval config, critic included."""
    from opsd.eval import multi_turn
    from opsd.eval.config import EvalConfig
    from opsd.eval.run import main as eval_main

    monkeypatch.setenv(ENV, ENV_KEY)
    base = EvalConfig(before=str(tiny_model_dir), after=str(tiny_model_dir), limit=1, max_new_tokens=4,
                      prefill="<tool_call>\n", device="cpu", precision="fp32", bootstrap=100,
                      critic=llm_critic(urls()[2]))
    single = dataclasses.replace(base, tasks="bfcl:multiple:heldout", out=str(tmp_path / "single"))
    eval_main(single, _ok_critiques, log=lambda *_: None)
    multi = dataclasses.replace(base, tasks="bfcl:multi_turn_base:heldout", out=str(tmp_path / "multi"))
    multi_turn.main(multi, _ok_critiques, max_steps_per_turn=1, log=lambda *_: None)
    for d in ("single", "multi"):
        assert "api-key=***" in (tmp_path / d / "report.json").read_text()
    assert_nowhere(tmp_path)
