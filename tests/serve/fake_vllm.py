"""Stands in for `python -m vllm.entrypoints.openai.api_server ...` (run through a `python` wrapper script).

Serves the StandIn endpoints plus /health on --port, after $FAKE_VLLM_DELAY seconds; exits with
$FAKE_VLLM_EXIT at once when that is set; spawns a child process, as vLLM spawns its engine core,
and writes the child's pid to $FAKE_VLLM_CHILD_PID, so tests can check that stop() leaves no orphans.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from opsd.io.models import load_tokenizer
from tests.serve.stand_in import StandIn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-m")
    p.add_argument("--model")
    p.add_argument("--served-model-name", default="smollm2")
    p.add_argument("--port", type=int)
    args, _ = p.parse_known_args()
    print("fake vLLM starting", flush=True)
    if os.environ.get("FAKE_VLLM_EXIT"):
        print("fake vLLM: RuntimeError: no CPU backend", flush=True)
        sys.exit(int(os.environ["FAKE_VLLM_EXIT"]))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if os.environ.get("FAKE_VLLM_CHILD_PID"):
        Path(os.environ["FAKE_VLLM_CHILD_PID"]).write_text(str(child.pid))
    time.sleep(float(os.environ.get("FAKE_VLLM_DELAY", "0")))
    srv = StandIn(load_tokenizer("smollm2-135m-instruct"), base_model=args.served_model_name,
                  base_root=args.model, port=args.port).start()
    print(f"fake vLLM ready on {srv.base_url}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
