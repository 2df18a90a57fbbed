# Newcomers: `make demo` runs the main job, `make test` runs the tests. Each sets up
# its own virtual environment (.venv) on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-gpu bench gpu-check clean

venv: $(STAMP)

# torch==2.13.0 first: on this project's machines pip takes that CPU build from
# local disk; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m peft_kernels.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# On a machine with a CUDA GPU: only the GPU-marked tests.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

bench: $(STAMP)
	$(BIN)/python -m pytest bench -q --benchmark-enable --benchmark-only --benchmark-columns=min,median,mean,rounds

# On a lent GPU machine (see bench/README.md): GPU tests, then the benchmark table.
gpu-check:
	bash bench/gpu_run.sh

clean:
	rm -rf $(VENV) build *.egg-info peft_kernels/_cuda/*.so peft_kernels/_cpu/*.so .benchmarks
