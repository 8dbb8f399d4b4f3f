# One command each: `make demo` (set up, then run the local end-to-end demo),
# `make test` (set up, then run the whole test suite, as CI does) and `make test-fast`
# (the unit tests: no end-to-end training, Serve or cluster runs). All build .venv on
# first use, with the versions pinned in requirements.lock.
PYTHON ?= python3
VENV ?= .venv
LOCK ?= requirements.lock
# The CPU build of PyTorch; on a GPU machine use e.g. TORCH="torch==2.13.0" TORCH_INDEX= (CUDA wheels).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lock

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml $(LOCK)
	$(BIN)/pip install --quiet -c $(LOCK) --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python jobs/demo.py

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# Re-resolve every dependency to its newest allowed version in a scratch venv and pin it.
# Re-measure the README's and RESULTS.md's figures after refreshing.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	.venv-lock/bin/pip install --quiet -e ".[test]"
	{ sed -n '1,2p' $(LOCK); .venv-lock/bin/pip freeze --all --exclude-editable | grep -v -i -E '^(torch|setuptools|wheel)=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock
