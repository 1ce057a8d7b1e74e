# `make run` and `make test` set the machine up first when needed (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
ARGS ?=

.PHONY: setup setup-gpu check-gpu-build run test test-unit lint docs bench clean-runs

$(STAMP): setup.cfg pyproject.toml scripts/setup.sh scripts/setup_lib.sh scripts/requirements.py scripts/horovod-0.28.1-tf2.21-cpu.patch
	bash scripts/setup.sh

setup:
	bash scripts/setup.sh

## The GPU environment .venv-gpu: TensorFlow with CUDA, Horovod with NCCL (docs/setup.md). Not part of `make test`.
GPU_VENV ?= .venv-gpu
setup-gpu:
	VENV=$(abspath $(GPU_VENV)) bash scripts/setup_gpu.sh

## Proves the GPU build on any machine, GPU or not: the build lists NCCL, and the multi-process tests pass with it.
check-gpu-build:
	$(GPU_VENV)/bin/python scripts/gpu_checks.py build
	$(GPU_VENV)/bin/python -m pytest -q -m "(horovod or mpi) and not slurm" --ignore tests/test_multihost.py \
	  --ignore tests/test_elastic.py $(ARGS)

## The main job: digits, simple CNN, horovodrun -np 2; writes runs/digits/.
run: $(STAMP)
	$(PY) scripts/run_digits.py $(ARGS)

## The whole suite: the linter, then unit tests and real horovodrun -np 2 integration tests.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not horovod and not mpi" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

## Regenerate docs/configuration.md from the config dataclasses' docstrings.
docs: $(STAMP)
	$(PY) scripts/config_reference.py

## Throughput benchmark (not a test): writes bench/results.json.
bench: $(STAMP)
	$(PY) scripts/bench.py $(ARGS)

clean-runs:
	rm -rf runs
