"""Fixtures for the critic tests: sample trajectories, a fake OpenAI-compatible server, LLM critics."""
from __future__ import annotations

import pytest

from opsd_critic.fake_server import FakeServer
from opsd.io.trajectories import load_trajectories
from tests.conftest import DATA, SAMPLE_LOGS

FAKE_KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture(scope="session")
def samples():
    """{id: Trajectory} of every hand-written sample log in data/."""
    return {t.id: t for t in load_trajectories([DATA / n for n in SAMPLE_LOGS])}


@pytest.fixture
def server():
    """Factory: server(script=[...], **kw) -> started FakeServer, stopped after the test."""
    started = []

    def make(script=None, **kw):
        s = FakeServer(script, **kw).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def llm_critic(monkeypatch):
    """Factory: llm_critic(server, **LLMConfig overrides) with short timeouts and backoff."""
    from opsd_critic.llm import LLMConfig, LLMCritic

    monkeypatch.setenv("OPSD_TEST_KEY", FAKE_KEY)

    def make(srv, **kw):
        cfg = dict(base_url=srv.base_url, model="fake-critic", api_key_env="OPSD_TEST_KEY", timeout=1.0,
                   max_attempts=3, backoff=0.05, max_wait=1.0, max_reasks=2)
        cfg.update(kw)
        return LLMCritic(LLMConfig(**cfg))

    return make
