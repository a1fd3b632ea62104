# Crop AI — one-command dev loop. Every target installs what it needs on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: help install demo test lint up down bench bench-gpu gpu-kit chaos sdk-suite clean

help:
	@echo "make demo   - start the local stack, analyse a real Sentinel-2 scene end to end, stop the stack"
	@echo "make test   - install everything and run the whole test suite (~7 min; PYTEST_WORKERS=4 processes)"
	@echo "make up     - start PostgreSQL, Azurite, the Service Bus emulator, the Functions host and a worker"
	@echo "make down   - stop what 'make up' started"
	@echo "make lint   - ruff + mypy strict"
	@echo "make bench  - benchmarks (JSON on stdout, ~18 min; the first run also builds and uploads a full tile): emulator,"
	@echo "              submit/status latency and their ratios to raw I/O, fields vs whole scene by URL,"
	@echo "              analysis Mpx/s per stage and / decode, worker jobs/s (also with Azure-like round trips) and"
	@echo "              database statements per job vs a naive consumer, a full tile's peak memory through the worker"
	@echo "              (docs/performance.md)"
	@echo "make bench-gpu - the GPU run (python -m bench.gpu, JSON): full tile on CUDA, GPU memory, decode vs compute,"
	@echo "              batching; needs only the worker's dependencies; prints a note and exits 0 without CUDA"
	@echo "make gpu-kit - .gpu/site.tar.xz: what bench.gpu needs that a lent GPU machine (no package index) lacks"
	@echo "make chaos  - chaos run on the local stack (~16 min; JSON on stdout): kills and outages lose no job"
	@echo "              (python -m local.chaos --short: the same in a few minutes)"
	@echo "make sdk-suite - the azure-servicebus SDK's own queue tests against the Service Bus emulator (~11 min; JSON"
	@echo "              on stdout; downloads the SDK's sdist once; local/servicebus_emulator/README.md)"

# Python virtual environment: torch 2.13.0 CPU first (a GPU image brings its own), then everything else.
# The project itself last, editable and without dependencies: the `crop-ai` console script (cli/).
$(STAMP): requirements.txt requirements-worker.txt requirements-cli.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Azurite (Blob Storage emulator) from npm, pinned in package-lock.json.
$(NODE_STAMP): package.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# checkov (Bicep security scan in tests/infra) in a venv of its own: its dependency pins conflict with ours.
$(CHECKOV_STAMP):
	test -x $(CHECKOV_VENV)/bin/python || $(PY) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -q checkov==3.3.30
	touch $@

install: $(STAMP) $(NODE_STAMP) $(CHECKOV_STAMP)

# The suite runs in PYTEST_WORKERS processes (pytest-xdist), a file per process at a time: most of its time is spent
# waiting on subprocesses, locks and timers, not on the CPU. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 4
test: install lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

up: install
	$(BIN)/python -m local.stack up

down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m local.stack down; fi

demo: install
	$(BIN)/python -m local.demo

bench: install
	$(BIN)/python -m bench.servicebus_emulator
	$(BIN)/python -m bench.queue_stats
	$(BIN)/python -m bench.submit_latency
	$(BIN)/python -m bench.analysis
	$(BIN)/python -m bench.api_latency
	$(BIN)/python -m bench.webhook_latency
	$(BIN)/python -m bench.worker_latency
	$(BIN)/python -m bench.submit_overhead
	$(BIN)/python -m bench.worker_throughput
	$(BIN)/python -m bench.worker_throughput --db-rtt-ms 1 --blob-rtt-ms 5 --bus-rtt-ms 5
	$(BIN)/python -m bench.db_round_trips
	$(BIN)/python -m bench.fields
	$(BIN)/python -m bench.worker_memory

# One prepared script for a GPU machine: the project's .venv when there is one, else the system Python (torch from
# the CUDA image, plus `pip install -r requirements-worker.txt`). It installs nothing: the GPU image brings its torch.
BENCH_GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
bench-gpu:
	$(BENCH_GPU_PY) -m bench.gpu

# For a GPU machine that reaches no package index: the wheels bench.gpu needs beyond its image, unpacked, as one
# archive to carry there (bench/gpu_kit.py; docs/performance.md, "GPU").
gpu-kit: install
	$(BIN)/python -m bench.gpu_kit

chaos: install
	$(BIN)/python -m local.chaos

sdk-suite: install
	$(BIN)/python -m local.sdk_suite

clean: down
	rm -rf .local
