"""`opsd serve`: run a vLLM server for rollouts until interrupted (its log in --log).

    opsd serve --log runs/serve/server.log --port 8000
    opsd rollout --backend completions --base-url http://127.0.0.1:8000/v1 --api-model smollm2 ...

For on-policy rounds in one process, use `VLLMServer` and `publish_adapter` (opsd.serve) instead.
"""
from __future__ import annotations

import json
import time

from opsd.serve.config import ServeConfig
from opsd.serve.server import VLLMServer


def main(cfg: ServeConfig) -> dict:
    """Start the server, print where it is, and keep it up until Ctrl-C (then stop it and its children)."""
    srv = VLLMServer(cfg)
    srv.start()
    info = {"base_url": srv.base_url, "model": srv.model_name, "log": str(srv.log_path),
            "startup_seconds": round(srv.startup_seconds or 0.0, 1)}
    print(json.dumps(info), flush=True)
    try:
        while srv.alive():
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return info
