"""The token-exact server backend against a local stand-in server (real HTTP, no engine, no model weights)."""
from __future__ import annotations

import json

import pytest

from opsd.io.records import read_jsonl
from opsd.io.tasks import load_tasks
from opsd.render import prompt_ids
from opsd.rollout.completions import parse_choice
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import main as rollout_main
from opsd.serve.adapters import AdapterError
from tests.serve.stand_in import StandIn

TASKS = "bfcl:simple_python:heldout"
N = 4


def _cfg(srv, out, **kw) -> RolloutConfig:
    fields = dict(tasks=TASKS, limit=N, out=str(out), backend="completions", base_url=srv.base_url,
                  api_model="smollm2", max_new_tokens=32, concurrency=4, timeout=10.0)
    return RolloutConfig(**fields | kw)


def _rows(path) -> list[dict]:
    return list(read_jsonl(path)) if path.exists() else []


def test_prompt_ids_sent_are_opsds_and_reply_ids_are_recorded(tmp_path, smol_tokenizer):
    out = tmp_path / "r.jsonl"
    with StandIn(smol_tokenizer) as srv:
        summary = rollout_main(_cfg(srv, out))
    assert summary["errors"] == 0 and summary["total"] == N
    tasks = {t.id: t for t in load_tasks(TASKS, limit=N)}
    prefill = "<tool_call>\n"
    prefill_ids = smol_tokenizer(prefill, add_special_tokens=False)["input_ids"]
    sent = {tuple(b["prompt"]) for b in srv.completions if b["max_tokens"] > 1}  # the probe asks for 1 token
    want = {tuple(prompt_ids(t.messages, t.tools, smol_tokenizer, prefill)) for t in tasks.values()}
    assert sent == want
    reply_ids = smol_tokenizer.encode(srv.reply_text("smollm2"), add_special_tokens=False)
    for row in _rows(out):
        msg = row["messages"][-1]
        assert msg["token_ids"] == prefill_ids + reply_ids
        assert msg["content"] == prefill + srv.reply_text("smollm2")
        assert msg["tool_calls"][0]["function"]["name"] == "smollm2"
        meta = row["meta"]
        assert meta["api"] == "completions" and meta["backend"] == "completions"
        assert meta["weights"] == {"model": "smollm2", "adapter": None, "path": "/models/base", "hash": None}
        assert meta["finish_reason"] == "stop"
    bodies = [b for b in srv.completions if b["max_tokens"] > 1]
    assert all(b["return_token_ids"] and b["stop"] == ["</tool_call>"] for b in bodies)


def test_server_prompt_ids_that_differ_are_errors_not_rollouts(tmp_path, smol_tokenizer):
    out = tmp_path / "r.jsonl"
    with StandIn(smol_tokenizer, mangle_prompt=True) as srv:
        summary = rollout_main(_cfg(srv, out))
    assert summary["errors"] == N and summary["total"] == 0 and _rows(out) == []
    errs = [json.loads(line) for line in open(str(out) + ".errors.jsonl")]
    assert len(errs) == N and all("TokenMismatchError" in e["error"] and "position 0" in e["error"] for e in errs)


def test_unknown_model_stops_before_anything_is_written(tmp_path, smol_tokenizer):
    out = tmp_path / "r.jsonl"
    with StandIn(smol_tokenizer) as srv:
        with pytest.raises(AdapterError, match=r"does not serve 'round_0-stale'.*smollm2"):
            rollout_main(_cfg(srv, out, api_model="round_0-stale"))
        assert [b for b in srv.completions] == []
    assert _rows(out) == []


def test_server_without_prompt_ids_falls_back_to_chat_and_says_so(tmp_path, smol_tokenizer):
    out = tmp_path / "r.jsonl"
    with StandIn(smol_tokenizer, accept_ids=False) as srv:
        summary = rollout_main(_cfg(srv, out))
    assert summary["total"] == N and len(srv.chats) == N
    for row in _rows(out):
        assert row["meta"]["api"] == "chat"
        assert "token_ids" not in row["messages"][-1]


def test_timeout_is_recorded_and_the_rerun_completes_without_duplicates(tmp_path, smol_tokenizer):
    out = tmp_path / "r.jsonl"
    with StandIn(smol_tokenizer, hang_after=3, hang_seconds=3) as srv:  # probe + 2 replies, then every call hangs
        first = rollout_main(_cfg(srv, out, timeout=0.5, concurrency=1))
    assert first["errors"] == N - 2 and first["total"] == 2
    errs = [json.loads(line)["error"] for line in open(str(out) + ".errors.jsonl")]
    assert all("Timeout" in e for e in errs), errs
    with StandIn(smol_tokenizer) as srv:
        second = rollout_main(_cfg(srv, out))
        asked = [b for b in srv.completions if b["max_tokens"] > 1]
    assert second["errors"] == 0 and second["total"] == N and len(asked) == N - 2
    keys = [r["key"] for r in _rows(out)]
    assert len(keys) == len(set(keys)) == N


def test_server_killed_mid_round_resumes_after_restart_without_duplicates(tmp_path, smol_tokenizer):
    out = tmp_path / "r.jsonl"
    srv = StandIn(smol_tokenizer, stop_after=2).start()  # probe + 1 reply, then the server is gone
    port = srv.port
    first = rollout_main(_cfg(srv, out, concurrency=1))
    srv.stop()
    assert first["total"] == 1 and first["errors"] == N - 1
    with StandIn(smol_tokenizer, port=port) as again:  # restarted on the same address
        second = rollout_main(_cfg(again, out))
    assert second["total"] == N and second["errors"] == 0
    keys = [r["key"] for r in _rows(out)]
    assert len(keys) == len(set(keys)) == N


def test_parse_choice_drops_the_end_of_turn_id_and_names_finish_reasons():
    eos = {2}
    stop = {"choices": [{"prompt_token_ids": [5, 6], "token_ids": [7, 8], "finish_reason": "stop",
                         "stop_reason": "</tool_call>", "text": "x</tool_call>"}]}
    assert parse_choice(stop, [5, 6], eos) == ([7, 8], "stop")
    ended = {"choices": [{"prompt_token_ids": [5, 6], "token_ids": [7, 2], "finish_reason": "stop",
                          "stop_reason": None, "text": "x"}]}
    assert parse_choice(ended, [5, 6], eos) == ([7], "eos")
    cut = {"choices": [{"prompt_token_ids": [5, 6], "token_ids": [7, 9], "finish_reason": "length", "text": "xy"}]}
    assert parse_choice(cut, [5, 6], eos) == ([7, 9], "length")


def test_cli_rollout_with_the_completions_backend(tmp_path, smol_tokenizer, capsys):
    from opsd.cli import main as cli

    out = tmp_path / "r.jsonl"
    with StandIn(smol_tokenizer) as srv:
        common = ["rollout", "--tasks", TASKS, "--limit", "2", "--out", str(out), "--backend", "completions",
                  "--base-url", srv.base_url, "--max-new-tokens", "16"]
        assert cli(common + ["--api-model", "smollm2"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["total"] == 2
        assert cli(common + ["--api-model", "round_9-gone", "--out", str(tmp_path / "other.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "does not serve 'round_9-gone'" in err and "Traceback" not in err
    assert cli(common + ["--api-model", "smollm2", "--out", str(tmp_path / "down.jsonl")]) == 1  # server gone
    assert "cannot reach the server" in capsys.readouterr().err
