# XRAI pipeline — every target installs what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
XRAI := $(VENV)/bin/xrai
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Prefect must not phone home, in targets or tests.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test lint bench bench-ingest bench-stats bench-train

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# CPU torch first (a local wheel on this machine), then everything else held to it.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(XRAI) demo --out $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench-ingest: setup
	$(PY) -m benchmarks.bench_ingest

bench-stats: setup
	$(PY) -m benchmarks.bench_stats

bench-train: setup
	$(PY) -m benchmarks.bench_train

bench: bench-ingest bench-stats bench-train
