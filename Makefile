# Two commands: `make demo` and `make test`. Both set up .venv first if needed.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.vaeft-installed
PYTEST_ARGS ?=

.PHONY: setup demo test clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	@scripts/setup.sh
	@touch $@

## Run the whole pipeline (curate -> pretrain -> ft-EMA -> ft-MSE -> evaluate -> export -> publish)
demo: setup
	@$(VENV)/bin/python -m flows.retrain

## Run the test suite
test: setup
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

## Remove pipeline outputs (DVC's cache keeps them; `dvc checkout` restores)
clean-outputs:
	rm -rf data/curated models logs metrics reports export artifacts
