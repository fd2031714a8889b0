"""`opsd serve`: run a vLLM server for rollouts until interrupted (its log in --log).

    opsd serve --log runs/serve/server.log --port 8000     # from any folder; Ctrl-C or SIGTERM stops it
    opsd rollout --backend completions --base-url http://127.0.0.1:8000/v1 --api-model smollm2 ...

For on-policy rounds in one process, use `VLLMServer` and `publish_adapter` (opsd.serve) instead.
"""
from __future__ import annotations

import json
import signal
import sys
import time

from opsd.serve.config import ServeConfig
from opsd.serve.server import VLLMServer, log_tail
from opsd.types import ServerError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # plus Ctrl-C (SIGINT, KeyboardInterrupt)


def _exit_on_signal(signum, frame) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C (so `finally` stops the server), exit code 128 + signal."""
    raise SystemExit(128 + signum)


def main(cfg: ServeConfig) -> dict:
    """Start the server, print where it is, and keep it up until Ctrl-C, SIGTERM or SIGHUP (then stop it and
    its children: the server runs in a session of its own, so it would outlive a plain kill of this process)."""
    previous = {s: signal.signal(s, _exit_on_signal) for s in STOP_SIGNALS}
    srv, info = VLLMServer(cfg), {}
    try:
        print(f"opsd serve: starting vLLM on {srv.base_url} (about a minute on CPU); its log: {srv.log_path}",
              file=sys.stderr, flush=True)
        srv.start()
        info = {"base_url": srv.base_url, "model": srv.model_name, "log": str(srv.log_path),
                "startup_seconds": round(srv.startup_seconds or 0.0, 1)}
        print(json.dumps(info), flush=True)
        while srv.alive():
            time.sleep(1.0)
        raise ServerError(f"the vLLM server exited with code {srv.proc.returncode}; its log {srv.log_path}:\n"
                          f"{log_tail(srv.log_path)}")
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return info
