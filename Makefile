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

.PHONY: setup demo test lint evidence bench bench-ingest bench-stats bench-train bench-scaling

# The statistics kernels compiled ahead of time (pipeline/aot.py): without a C compiler the
# build fails, says so, and the statistics run numba's JIT (same results, slower start).
AOT := stats/_fused_aot.json
setup: $(STAMP) $(AOT)

$(AOT): $(STAMP) stats/fused_kernels.py stats/fused.py pipeline/standardize_kernels.py pipeline/aot.py
	$(PY) -m pipeline.aot || true

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

# The controlled study behind the manifest's rules; writes docs/evidence.md (under 40 minutes
# on 2 CPU cores). SCALE=full runs it in 3D on a GPU; SCALE=smoke checks the machinery.
# Reports: default -> docs/evidence.md, full -> docs/evidence-full.md (both committed),
# smoke -> runs/evidence-smoke/evidence.md (never over a committed report).
SCALE ?= default
EVIDENCE_REPORT = $(if $(filter default,$(SCALE)),docs/evidence.md,$(if $(filter full,$(SCALE)),docs/evidence-full.md,runs/evidence-$(SCALE)/evidence.md))
evidence: setup
	$(XRAI) evidence --scale $(SCALE) --out runs/evidence-$(SCALE) --report $(EVIDENCE_REPORT)

lint: setup
	$(VENV)/bin/ruff check .

bench-ingest: setup
	$(PY) -m benchmarks.bench_ingest

bench-stats: setup
	$(PY) -m benchmarks.bench_stats

bench-train: setup
	$(PY) -m benchmarks.bench_train

# The statistics stage's cost model, checked on a real dask scheduler + worker processes;
# rewrites docs/scaling.md from the run.
bench-scaling: setup
	$(PY) -m benchmarks.bench_scaling --write-doc docs/scaling.md

bench: bench-ingest bench-stats bench-train

# --- Prefect: server and UI, served deployments, the end-to-end flow ---------------
PORT ?= 4200
DATASET ?= phantom
SOURCE ?= phantom
CONFIG ?= xrai-deployments.yaml
PREFECT_HOME_DIR := $(CURDIR)/.prefect
PREFECT_ENV := PREFECT_HOME=$(PREFECT_HOME_DIR) DO_NOT_TRACK=1 \
	PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_API_HOST=127.0.0.1 \
	PREFECT_SERVER_API_PORT=$(PORT) PREFECT_SERVER_UI_API_URL=http://127.0.0.1:$(PORT)/api \
	PREFECT_LOGGING_EXTRA_LOGGERS=pipeline,stats
.PHONY: server serve pipeline e2e e2e-browser
server: setup
	$(PREFECT_ENV) $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PORT) --analytics-off

serve: setup
	$(PREFECT_ENV) PREFECT_API_URL=http://127.0.0.1:$(PORT)/api $(PY) -m flows serve --config $(CONFIG)

pipeline: setup
	@api=$$($(PY) -m flows server-url --port $(PORT)); \
	if [ -n "$$api" ]; then echo "pipeline: running against the Prefect server at $$api"; \
	else echo "pipeline: no server on port $(PORT); Prefect starts a temporary one (15-20 s)"; fi; \
	env $(PREFECT_ENV) $${api:+PREFECT_API_URL=$$api} $(PY) -m flows pipeline \
		--dataset $(DATASET) --source $(SOURCE)

# A fresh server on a free port, the pipeline with a short training, the API checks and the
# artifact pages in headless Chromium (flows/e2e.py; about a minute on two cores).
# SCREENSHOTS=docs/ also rewrites docs/ui-verdict.png and docs/ui-training.png from the run.
e2e: setup e2e-browser
	$(PY) -m flows.e2e $(if $(SCREENSHOTS),--screenshots $(SCREENSHOTS))

# Debian's chromium, for make e2e only (make test never needs it).
e2e-browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
		echo "e2e: installing Debian's chromium (apt-get)"; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq chromium; }
