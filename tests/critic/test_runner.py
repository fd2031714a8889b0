"""Resumable runs: rerun skips done keys, kill + rerun gives every trajectory exactly once,
the API key never reaches disk or output, and the CLI end to end."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from critic import make_critic
from critic.fake_server import Reply, Status
from critic.runner import format_summary, run_critiques
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
    for r in recs:
        assert r["key"] == f"{r['trajectory_hash']}:{r['critic']['config_hash']}"
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
    args = ["critique", "--in", str(logs), "--out", str(out), "--critic", "llm", "--base-url", srv.base_url,
            "--model", "m", "--concurrency", "4", "--timeout", "5", "--no-progress"]
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


def test_api_key_never_reaches_disk_or_output(samples, server, tmp_path):
    logs = _variants(samples, 6, tmp_path / "logs.jsonl")
    out = tmp_path / "c.jsonl"
    leak = {"error": {"message": f"upstream rejected header 'Authorization: Bearer {FAKE_KEY}'"}}
    srv = server([Status(500, leak)] * 3 + [Reply("not json")] * 3, responder=None)
    p = _cli("-v", "critique", "--in", str(logs), "--out", str(out), "--critic", "llm", "--base-url", srv.base_url,
             "--model", "m", "--api-key-env", "MY_CRITIC_KEY", "--max-attempts", "1", "--backoff", "0.01",
             "--concurrency", "1", env={"MY_CRITIC_KEY": FAKE_KEY})
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    recs = list(read_jsonl(out))
    assert len(recs) == 6 and any(r["verdict"] == "failed" and "***" in r["error"] for r in recs)
    assert FAKE_KEY not in stdout and FAKE_KEY not in stderr
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert FAKE_KEY.encode() not in f.read_bytes(), f
    assert FAKE_KEY not in json.dumps(srv.requests)  # the server keeps bodies, never headers
    # a fatal auth error says what to check, without the key
    srv2 = server([Status(401, leak)])
    p = _cli("critique", "--in", str(logs), "--out", str(tmp_path / "d.jsonl"), "--critic", "llm", "--base-url",
             srv2.base_url, "--model", "m", env={"OPENAI_API_KEY": FAKE_KEY})
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 1 and "401" in stderr and "OPENAI_API_KEY" in stderr
    assert FAKE_KEY not in stdout + stderr


def test_cli_errors_are_clear(tmp_path):
    p = _cli("critique", "--in", *SAMPLES, "--out", str(tmp_path / "c.jsonl"), "--critic", "llm", "--model", "m")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "no API key" in err and "OPENAI_API_KEY" in err
    p = _cli("critique", "--in", *SAMPLES, "--out", str(tmp_path / "c.jsonl"), "--critic", "llm")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "--model" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    p = _cli("critique", "--in", str(bad), "--out", str(tmp_path / "c.jsonl"))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "bad.jsonl:1" in err


@pytest.mark.parametrize("critic", ["schema", "schema+reference"])
def test_cli_on_samples(tmp_path, critic):
    p = _cli("critique", "--in", *SAMPLES, "--out", str(tmp_path / "c.jsonl"), "--critic", critic, "--no-progress")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "13 trajectories: 13 critiqued now" in out and "error 8" in out
