# One command each: `make demo` (set up, then run the local end-to-end demo) and
# `make test` (set up, then run the test suite). Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; on a GPU machine use e.g. TORCH="torch==2.13.0" TORCH_INDEX= (CUDA wheels).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

BIN := $(VENV)/bin

.PHONY: setup demo test

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python jobs/demo.py

test: setup
	$(BIN)/python -m pytest
