"""Resumable runs: rerun skips done keys, kill + rerun gives every trajectory exactly once,
the API key never reaches disk or output, and the CLI end to end."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from opsd_critic import make_critic
from opsd_critic.fake_server import OK_REPLY, Reply, Status
from opsd_critic.runner import (
    critic_input_hash,
    format_summary,
    read_critiques,
    run_critiques,
)
from opsd.io.records import read_jsonl
from opsd.types import Critique
from tests.conftest import DATA, ROOT, SAMPLE_LOGS
from tests.critic.conftest import FAKE_KEY

SAMPLES = [str(DATA / n) for n in SAMPLE_LOGS]


def _variants(samples, n, path):
    base = samples["weather-enum"]
    with open(path, "w") as f:
        for i in range(n):
            msgs = [dict(m) for m in base.messages]
            msgs[1] = {"role": "user", "content": f"Weather in Oslo in kelvin please (request {i})."}
            f.write(json.dumps({"id": f"v{i:03d}", "messages": msgs, "tools": base.tools}) + "\n")
    return path


def _cli(*args, env=None, **kw):
    e = {k: v for k, v in os.environ.items() if not k.endswith("API_KEY")}
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "opsd.cli", *args], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_rerun_skips_done_and_summary_counts(samples, tmp_path):
    out = tmp_path / "c.jsonl"
    s1 = run_critiques(list(samples.values()), make_critic("schema"), out, progress=False)
    assert (s1.new, s1.skipped) == (13, 0) and s1.verdicts["error"] == 8 and s1.verdicts["ok"] == 5
    assert s1.categories["unknown_tool"] == 2 and s1.categories["missing_required"] == 2
    s2 = run_critiques(list(samples.values()), make_critic("schema"), out, progress=False)
    assert (s2.new, s2.skipped) == (0, 13) and s2.verdicts == s1.verdicts
    recs = list(read_jsonl(out))
    assert len(recs) == 13 and len({r["key"] for r in recs}) == 13
    by_id = {t.id: t for t in samples.values()}
    for r in recs:
        assert r["key"] == f"{r['trajectory_id']}:{critic_input_hash(by_id[r['trajectory_id']])}:{r['critic']['config_hash']}"
        Critique.from_dict(r)  # round-trips
    # another critic config gets its own keys in the same file
    s3 = run_critiques(list(samples.values()), make_critic("schema", max_hint_tokens=40), out, progress=False)
    assert s3.new == 13
    assert "error 8" in format_summary(s1) and "unknown_tool 2" in format_summary(s1)


def test_a_crashing_critic_is_recorded_as_failed(samples, tmp_path):
    critic = make_critic("schema")

    async def boom(traj):
        if traj.id == "weather-enum":
            raise RuntimeError("bug in the critic")
        return critic.check(traj)

    critic.critique = boom
    s = run_critiques(list(samples.values()), critic, tmp_path / "c.jsonl", progress=False)
    assert s.new == 13 and s.verdicts["failed"] == 1
    rec = next(r for r in read_jsonl(tmp_path / "c.jsonl") if r["trajectory_id"] == "weather-enum")
    assert rec["verdict"] == "failed" and "bug in the critic" in rec["error"]


def test_schema_plus_reference_chain(samples, tmp_path):
    from opsd.io.tasks import bfcl
    from tests.critic.perturb import to_trajectory

    task = bfcl.load("simple_python")[0]
    wrong = to_trajectory(task, [("calculate_triangle_area", {"base": 10, "height": 6})], raw=True, tid="wrong")
    right = to_trajectory(task, [("calculate_triangle_area", {"base": 10, "height": 5})], raw=True, tid="right")
    badtype = to_trajectory(task, [("calculate_triangle_area", {"base": "ten", "height": 5})], raw=True, tid="t")
    s = run_critiques([wrong, right, badtype, samples["weather-ok"]], make_critic("schema+reference"),
                      tmp_path / "c.jsonl", progress=False)
    by_id = {r["trajectory_id"]: r for r in read_jsonl(tmp_path / "c.jsonl")}
    assert by_id["wrong"]["category"] == "wrong_value" and by_id["wrong"]["quote"] == "6"
    assert by_id["right"]["verdict"] == "ok" and by_id["weather-ok"]["verdict"] == "ok"  # no ground truth: schema ok stands
    assert by_id["t"]["category"] == "type_mismatch"  # schema decides first
    assert {r["critic"]["name"] for r in by_id.values()} == {"schema+reference"} and s.new == 4


def test_kill_and_resume_gives_every_trajectory_exactly_once(samples, server, tmp_path):
    n = 60
    logs = _variants(samples, n, tmp_path / "logs.jsonl")
    out = tmp_path / "c.jsonl"
    srv = server(latency=0.05)
    args = ["critique", "--in", str(logs), "--out", str(out), "--critic.name", "llm", "--critic.base-url", srv.base_url,
            "--critic.model", "m", "--critic.concurrency", "4", "--critic.timeout", "5", "--no-progress"]
    env = {"OPENAI_API_KEY": FAKE_KEY}
    for _ in range(2):  # kill twice mid-run
        p = _cli(*args, env=env)
        t0 = time.monotonic()
        start = len(out.read_text().splitlines()) if out.exists() else 0
        while time.monotonic() - t0 < 60:
            if out.exists() and len(out.read_text().splitlines()) >= start + 10:
                break
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
    done = len(out.read_text().splitlines())
    assert 0 < done < n, "the kill must land mid-run"
    with open(out, "a") as f:  # a torn last line, as a kill during a write leaves it
        f.write('{"trajectory_id": "v999", "verdict": "ok", "ke')
    p = _cli(*args, env=env)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    recs = list(read_jsonl(out))
    ids = [r["trajectory_id"] for r in recs]
    assert sorted(ids) == [f"v{i:03d}" for i in range(n)]  # no duplicates, no gaps
    assert len({r["key"] for r in recs}) == n
    assert f"{n - done} critiqued now, {done} already done" in stdout


QUERY_KEY = "qk-QUERY-SECRET-9876543210"


@pytest.mark.parametrize("verbose", [True, False])
def test_secrets_never_reach_output_logs_or_records(samples, server, tmp_path, verbose):
    """The API key (echoed back by the server in an error body and in a bad reply) and a key in the
    base URL's query appear nowhere: stdout, stderr (-v debug lines and the HTTP client's request
    log included), the critique records, or any other file."""
    logs = _variants(samples, 8, tmp_path / "logs.jsonl")
    out = tmp_path / "c.jsonl"
    leak = {"error": {"message": f"upstream rejected header 'Authorization: Bearer {FAKE_KEY}' for ?api-key={QUERY_KEY}"}}
    echo = json.dumps({"verdict": f"Bearer {FAKE_KEY} {QUERY_KEY}", "step": 2, "quote": "x", "hint": "y", "category": "z"})
    srv = server([Status(500, leak)] * 2 + [Reply(echo)] * 3)
    p = _cli(*(["-v"] if verbose else []), "critique", "--in", str(logs), "--out", str(out), "--critic.name", "llm",
             "--critic.base-url", f"{srv.base_url}?api-key={QUERY_KEY}", "--critic.model", "m", "--critic.api-key-env", "MY_CRITIC_KEY",
             "--critic.max-attempts", "1", "--critic.backoff", "0.01", "--critic.concurrency", "1", "--critic.max-transport-failure-share", "0.5",
             env={"MY_CRITIC_KEY": FAKE_KEY})
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    recs = list(read_jsonl(out))
    assert len(recs) == 8 and sum(r["verdict"] == "failed" and "***" in r["error"] for r in recs) == 3
    assert srv.query_names == [["api-key"]] * 10  # the query key is sent with every request, as a parameter
    for secret in (FAKE_KEY, QUERY_KEY):
        assert secret not in stdout and secret not in stderr
        for f in tmp_path.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f
    assert FAKE_KEY not in json.dumps(srv.requests)  # the server keeps bodies, never headers
    if verbose:  # the request log and the failed validation's debug line are shown, redacted
        assert "HTTP Request: POST" in stderr and "api-key=***" in stderr and "invalid reply" in stderr
    else:
        assert "HTTP Request" not in stderr and "invalid reply" not in stderr
    # a fatal auth error says what to check, without the key
    srv2 = server([Status(401, leak)])
    p = _cli("critique", "--in", str(logs), "--out", str(tmp_path / "d.jsonl"), "--critic.name", "llm", "--critic.base-url",
             f"{srv2.base_url}?api-key={QUERY_KEY}", "--critic.model", "m", env={"OPENAI_API_KEY": FAKE_KEY})
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 1 and "401" in stderr and "OPENAI_API_KEY" in stderr
    assert FAKE_KEY not in stdout + stderr and QUERY_KEY not in stdout + stderr


USER_KEY = "uk-USERINFO-SECRET-1234567"


def test_a_key_in_the_url_userinfo_reaches_no_output(samples, server, tmp_path):
    """`http://user:KEY@host/v1`: the server echoes the Authorization header it got (the client's Basic token of
    user:KEY, or the Bearer key) and the URL; neither the key nor its Basic token is in stdout, stderr or any file."""
    import base64

    logs = _variants(samples, 4, tmp_path / "logs.jsonl")
    basic = base64.b64encode(f"user:{USER_KEY}".encode()).decode()
    leak = {"error": {"message": f"rejected 'Authorization: Basic {basic}' and Bearer {FAKE_KEY} for "
                                 f"http://user:{USER_KEY}@host/v1"}}
    srv = server([Status(500, leak)] * 4)
    url = srv.base_url.replace("http://", f"http://user:{USER_KEY}@")
    p = _cli("-v", "critique", "--in", str(logs), "--out", str(tmp_path / "c.jsonl"), "--critic.name", "llm",
             "--critic.base-url", url, "--critic.model", "m", "--critic.max-attempts", "1", "--critic.backoff", "0.01",
             "--critic.concurrency", "1", env={"OPENAI_API_KEY": FAKE_KEY})
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 1 and "***" in (tmp_path / "c.jsonl").read_text(), stderr[-2000:]
    for secret in (USER_KEY, basic, FAKE_KEY):
        assert secret not in stdout and secret not in stderr
        for f in tmp_path.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f


def test_a_run_that_fails_as_a_whole_exits_non_zero(samples, server, tmp_path):
    logs = _variants(samples, 4, tmp_path / "logs.jsonl")
    srv = server([Status(503)] * 100)
    args = ["critique", "--in", str(logs), "--out", str(tmp_path / "c.jsonl"), "--critic.name", "llm", "--critic.base-url",
            srv.base_url, "--critic.model", "m", "--critic.max-attempts", "2", "--critic.backoff", "0.01", "--no-progress"]
    p = _cli(*args, env={"OPENAI_API_KEY": FAKE_KEY})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "every critique of this run failed" in err and "retryable 4" in out
    srv.script.clear()  # the server is back: the rerun retries the 4 retryable failures
    p = _cli(*args, env={"OPENAI_API_KEY": FAKE_KEY})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "4 critiqued now, 0 already done (4 failed before and retried)" in out and "ok 4" in out


def test_cli_errors_are_clear(tmp_path):
    p = _cli("critique", "--in", *SAMPLES, "--out", str(tmp_path / "c.jsonl"), "--critic.name", "llm", "--critic.model", "m")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "no API key" in err and "OPENAI_API_KEY" in err
    p = _cli("critique", "--in", *SAMPLES, "--out", str(tmp_path / "c.jsonl"), "--critic.name", "llm")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "(--critic.model M)" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    p = _cli("critique", "--in", str(bad), "--out", str(tmp_path / "c.jsonl"))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "bad.jsonl:1" in err


@pytest.mark.parametrize("critic", ["schema", "schema+reference"])
def test_cli_on_samples(tmp_path, critic):
    p = _cli("critique", "--in", *SAMPLES, "--out", str(tmp_path / "c.jsonl"), "--critic.name", critic, "--no-progress")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "13 trajectories: 13 critiqued now" in out and "error 8" in out


def test_one_record_per_input_trajectory_and_the_key_covers_meta(samples, tmp_path):
    """Identical content under two ids gets two records; a fixed meta.ground_truth is re-critiqued."""
    from opsd.io.tasks import bfcl
    from tests.critic.perturb import to_trajectory

    task = bfcl.load("simple_python")[0]
    a = to_trajectory(task, [("calculate_triangle_area", {"base": 10, "height": 5})], raw=True, tid="session-A")
    b = to_trajectory(task, [("calculate_triangle_area", {"base": 10, "height": 5})], raw=True, tid="session-B")
    out = tmp_path / "c.jsonl"
    s = run_critiques([a, b], make_critic("schema+reference"), out, progress=False)
    assert s.new == 2 and sorted(r["trajectory_id"] for r in read_jsonl(out)) == ["session-A", "session-B"]
    # the user fixes the ground truth (height 6 is right): the stale "ok" must not be reused
    fixed = to_trajectory(task, [("calculate_triangle_area", {"base": 10, "height": 5})], raw=True, tid="session-A")
    fixed.meta["ground_truth"] = [{"calculate_triangle_area": {"base": [10], "height": [6], "unit": ["", "units"]}}]
    s = run_critiques([fixed, b], make_critic("schema+reference"), out, progress=False)
    assert (s.new, s.skipped) == (1, 1)
    last = read_critiques(out)
    assert [c.category for c in last.values() if c.trajectory_id == "session-A" and c.verdict == "error"] == ["wrong_value"]


def _flaky(samples, n):
    base = samples["weather-enum"]
    return [base.__class__(f"f{i}", [*base.messages[:1], {"role": "user", "content": f"request {i}"}, *base.messages[2:]],
                           base.tools) for i in range(n)]


def test_transport_failures_are_retryable_and_retried_by_the_next_run(samples, server, llm_critic, tmp_path):
    trajs, out = _flaky(samples, 4), tmp_path / "c.jsonl"
    down = server([Status(503)] * 100)
    s = run_critiques(trajs, llm_critic(down, max_attempts=2), out, concurrency=1, progress=False,
                      max_transport_failure_share=0.5)
    assert (s.new, s.failed_now, s.transport_failed) == (4, 4, 4)
    assert s.error and "every critique of this run failed" in s.error
    assert all(r["retryable"] and r["verdict"] == "failed" for r in read_jsonl(out))
    assert "retryable 4 transport failures" in format_summary(s)
    # "none" keeps them; the default retries them and the new record supersedes the old one
    up = server()
    s = run_critiques(trajs, llm_critic(up), out, progress=False, retry_failed="none")
    assert (s.new, s.skipped) == (0, 4) and up.requests == []
    s = run_critiques(trajs, llm_critic(up), out, progress=False)
    assert (s.new, s.retried, s.skipped) == (4, 4, 0) and s.verdicts == {"ok": 4} and s.error is None
    assert len(list(read_jsonl(out))) == 8 and {c.verdict for c in read_critiques(out).values()} == {"ok"}
    s = run_critiques(trajs, llm_critic(up), out, progress=False)
    assert (s.new, s.skipped) == (0, 4)


def test_bad_replies_stay_final_unless_retry_all(samples, server, llm_critic, tmp_path):
    trajs, out = _flaky(samples, 3), tmp_path / "c.jsonl"
    srv = server([Reply("no json here")] * 9)
    s = run_critiques(trajs, llm_critic(srv, max_reasks=2), out, concurrency=1, progress=False)
    assert s.failed_now == 3 and s.transport_failed == 0 and not any(r["retryable"] for r in read_jsonl(out))
    s = run_critiques(trajs, llm_critic(srv), out, progress=False)
    assert s.new == 0 and s.skipped == 3
    s = run_critiques(trajs, llm_critic(srv), out, progress=False, retry_failed="all")
    assert s.new == 3 and s.verdicts == {"ok": 3}


def test_too_many_transport_failures_fail_the_run(samples, server, llm_critic, tmp_path):
    trajs = _flaky(samples, 10)
    srv = server([Status(500)] * 2 + [Reply(OK_REPLY)] * 100)
    s = run_critiques(trajs, llm_critic(srv, max_attempts=1), tmp_path / "a.jsonl", concurrency=1, progress=False,
                      max_transport_failure_share=0.1)
    assert s.transport_failed == 2 and "2 of 10 critiques failed on transport errors" in s.error
    srv2 = server([Status(500)] * 1 + [Reply(OK_REPLY)] * 100)
    s = run_critiques(trajs, llm_critic(srv2, max_attempts=1), tmp_path / "b.jsonl", concurrency=1, progress=False,
                      max_transport_failure_share=0.1)
    assert s.transport_failed == 1 and s.error is None
