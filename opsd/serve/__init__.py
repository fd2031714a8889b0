"""Inference servers for rollouts: start/stop vLLM from its own venv, and put each round's student into it.

    from opsd.serve import ServeConfig, VLLMServer, publish_adapter
    with VLLMServer(ServeConfig(log="runs/loop/server.log")) as srv:
        name = publish_adapter(srv, "runs/loop/round_0/train")          # LoRA hot-load; -> model name
        # opsd rollout --backend completions --base-url {srv.base_url} --api-model {name} ...
"""
from opsd.serve.adapters import (
    AdapterClient,
    AdapterError,
    files_hash,
    publish_adapter,
    publish_full_weights,
    served_weights,
)
from opsd.serve.config import ServeConfig
from opsd.serve.server import VLLMServer
from opsd.types import ServerError

__all__ = ["AdapterClient", "AdapterError", "ServeConfig", "ServerError", "VLLMServer", "files_hash",
           "publish_adapter", "publish_full_weights", "served_weights"]
