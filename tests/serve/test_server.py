"""VLLMServer lifecycle (start, readiness, log, crash, kill, restart with adapters reloaded) on a fake engine.

The fake engine is tests/serve/fake_vllm.py behind a `python` wrapper, so the exact command line,
environment, process group handling and readiness wait of opsd.serve.server are exercised without vLLM.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

from opsd.serve.adapters import (
    client_for,
    publish_adapter,
    publish_full_weights,
    served_weights,
)
from opsd.serve.config import ServeConfig
from opsd.serve.server import ServerError, VLLMServer, vllm_command, vllm_env
from tests.serve.test_adapters import make_adapter

FAKE = Path(__file__).with_name("fake_vllm.py")


@pytest.fixture()
def fake_python(tmp_path) -> str:
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_command_uses_the_module_entry_point_and_runtime_lora(tmp_path):
    cfg = ServeConfig(python="/venv/bin/python", max_lora_rank=32, kv_cache_gb=0.5)
    cmd = vllm_command(cfg, "/models/smol", 8123)
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32" and "--enable-lora" in cmd
    env = vllm_env(cfg)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        assert env["VLLM_CPU_KVCACHE_SPACE"] == "0.5"


@pytest.mark.parametrize("kw, msg", [(dict(max_lora_rank=12), "max_lora_rank"), (dict(dtype="fp8"), "dtype"),
                                     (dict(port=70000), "port")])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ServeConfig(**kw)


def test_missing_venv_says_how_to_make_it(tmp_path):
    with pytest.raises(ServerError, match="make vllm"):
        VLLMServer(ServeConfig(python=str(tmp_path / "nope" / "python"))).start()


def test_engine_that_dies_at_start_is_reported_with_its_log(tmp_path, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_EXIT", "3")
    log = tmp_path / "server.log"
    with pytest.raises(ServerError, match=r"exited with code 3(.|\n)*no CPU backend"):
        VLLMServer(ServeConfig(python=fake_python, log=str(log), startup_timeout=60)).start()
    assert "no CPU backend" in log.read_text()


def test_start_waits_for_health_and_stop_leaves_no_orphans(tmp_path, fake_python, monkeypatch):
    pidfile = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_VLLM_CHILD_PID", str(pidfile))
    monkeypatch.setenv("FAKE_VLLM_DELAY", "1.5")
    srv = VLLMServer(ServeConfig(python=fake_python, log=str(tmp_path / "server.log"), startup_timeout=60))
    with srv:
        assert httpx.get(srv.root_url + "/health").status_code == 200  # ready means ready
        assert srv.startup_seconds >= 1.5
        child, server_pid = int(pidfile.read_text()), srv.proc.pid
        assert _alive(child) and _alive(server_pid)
    assert not _alive(server_pid)
    assert not _alive(child), "the engine's child process outlived stop()"
    assert "fake vLLM ready" in (tmp_path / "server.log").read_text()


def test_restart_after_a_crash_reloads_published_adapters(tmp_path, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_CHILD_PID", str(tmp_path / "child.pid"))
    srv = VLLMServer(ServeConfig(python=fake_python, log=str(tmp_path / "server.log"), startup_timeout=60))
    with srv:
        name = publish_adapter(srv, make_adapter(tmp_path / "round_0" / "train" / "model"), label="round_0")
        port = srv.port
        srv.kill()
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.base_url + "/models", timeout=2)
        srv.start()
        assert srv.port == port and srv.starts == 2
        ids = [m["id"] for m in httpx.get(srv.base_url + "/models").json()["data"]]
        assert name in ids
    assert (tmp_path / "server.log").read_text().count("==== opsd: starting vLLM") == 2


def test_full_weights_are_served_by_a_restart(tmp_path, fake_python, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("FAKE_VLLM_CHILD_PID", str(tmp_path / "child.pid"))
    srv = VLLMServer(ServeConfig(python=fake_python, log=str(tmp_path / "server.log"), startup_timeout=60))
    with srv:
        assert publish_full_weights(srv, tiny_model_dir) == "smollm2"
        assert srv.starts == 2
        w = served_weights(client_for(srv), "smollm2")
        assert w["path"] == str(Path(tiny_model_dir).resolve()) and w["adapter"] is None and w["hash"]


def test_default_venv_is_found_from_the_repository_not_the_cwd(tmp_path, monkeypatch):
    """`make vllm` puts .venv-vllm in the repository root; `opsd serve` run from another folder must look there."""
    import opsd
    from opsd.serve.config import VLLM_PYTHON_ENV, default_vllm_python

    monkeypatch.delenv(VLLM_PYTHON_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    repo_python = Path(opsd.__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    assert default_vllm_python() == str(repo_python)
    (tmp_path / ".venv-vllm" / "bin").mkdir(parents=True)  # one in the cwd is used only when the repository has none
    (tmp_path / ".venv-vllm" / "bin" / "python").write_text("")
    assert default_vllm_python() == str(repo_python if repo_python.is_file() else tmp_path / ".venv-vllm/bin/python")


def test_sigterm_to_opsd_serve_stops_the_server_and_its_engine(tmp_path, fake_python):
    """`opsd serve` says it is starting at once; SIGTERM (not only Ctrl-C) stops the server and its engine child,
    which run in a session of their own and used to outlive it, still answering /health."""
    import json
    import signal
    import subprocess
    import time

    pidfile, log = tmp_path / "child.pid", tmp_path / "server.log"
    env = {**os.environ, "FAKE_VLLM_CHILD_PID": str(pidfile), "FAKE_VLLM_DELAY": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "opsd.cli", "serve", "--python", fake_python, "--log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        info = json.loads(proc.stdout.readline())  # printed once /health answers
        assert httpx.get(info["base_url"].removesuffix("/v1") + "/health").status_code == 200
        child = int(pidfile.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert "starting vLLM" in err and str(log) in err, err
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(child), "the engine's child process outlived opsd serve"
    with pytest.raises(httpx.HTTPError):
        httpx.get(info["base_url"].removesuffix("/v1") + "/health", timeout=2)
