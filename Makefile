# visionops: `make run` and `make test` set everything up on a fresh machine, then do their job.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
# scale: the servers' clients and binaries for `make services` (the suite's `services` tests use them)
EXTRAS ?= test,scale
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false

.PHONY: help setup run test test-fast bench ui clean deps repro-check services services-stop plots exps

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[$(EXTRAS)]'
	@touch $@

# the page `dvc plots show` fills (.dvc/config: plots.html_template), with vega inline: no network needed
PLOTS_PAGE := .dvc/plots/offline.html
$(PLOTS_PAGE): $(STAMP) src/visionops/plots_page.py
	python -m visionops.plots_page

setup: $(STAMP) $(PLOTS_PAGE)  ## create .venv and install pinned dependencies (once)

plots: setup  ## every declared plot in dvc_plots/index.html, drawn offline (dvc plots show)
	dvc plots show

run: setup  ## run the DVC pipeline (dvc repro) on the data source in params.yaml
	visionops check > /dev/null
	dvc repro

# One thread per test process (multi-threaded CPU backward in distill aborted twice in torch 2.14.1: see
# the note on issue 3), and TEST_WORKERS test processes side by side (pytest-xdist), each taking whole
# test files in turn, so a module's shared fixtures (a pipeline run, a set of servers) are built once.
# In CI on 2 cores 444 tests took 1,023 s with 2 workers, against 1,450 s in one process; 529 tests took 1,315 s
# with 2 workers at c17549f (the slowest: bench/README.md, "The test suite").
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 pytest -n $(TEST_WORKERS) --dist loadfile

test: setup  ## run the whole test suite
	$(PYTEST)

test-fast: setup  ## the suite without tests marked slow
	$(PYTEST) -m "not slow"

deps: setup  ## rewrite each stage's code deps in dvc.yaml from its import closure (a test checks them)
	python -m visionops.stage_deps

repro-check: setup  ## two fresh clones run the pipeline: their dvc.lock must equal each other and the committed one
	python bench/check_reproducible.py

bench: setup  ## benchmarks (see bench/README.md)
	cd bench && python bench_validate.py && python bench_train_throughput.py && python bench_make_run.py

# Only what differs between the experiments (--only-changed), without the dependency hashes
# (paths without a `file:` metric prefix), the creation time, two secondary metrics and the membership audit (`dvc exp show` has all): fits ~120 columns
EXPS_DROP ?= Created|(data|models|reports|src)/[^:]*$$|balanced_accuracy|macro_f1|student_gap|(.*:)?mia_
exps:  ## DVC experiments side by side: the params and metrics that differ (dvc exp show, readable)
	@dvc exp show --no-pager --only-changed --drop '$(EXPS_DROP)'

MLFLOW_PORT ?= 5000
ui: setup  ## MLflow UI (one worker) on http://127.0.0.1:$(MLFLOW_PORT); prints the link to the experiment's runs
	python -m visionops.tracking.mlflow_ui --host 127.0.0.1 --port $(MLFLOW_PORT)

# ---- the services at scale (infra/services.py): all on 127.0.0.1, all data under $(SERVICES_DIR) ------
SERVICES_DIR ?= $(CURDIR)/.services
WORKERS ?= 1
services: setup  ## PostgreSQL, SeaweedFS (S3), MLflow + Prefect servers, WORKERS=1 worker(s) on 127.0.0.1; then source .services/env
	python infra/services.py start --dir "$(SERVICES_DIR)" --workers $(WORKERS)

services-stop:  ## stop exactly what `make services` started (by PID); the data stays for the next start
	$(BIN)/python infra/services.py stop --dir "$(SERVICES_DIR)"

clean:  ## remove pipeline outputs and run state (keeps .venv)
	rm -rf data/dataset data/prepared reports .dvc/tmp

# ---- Prefect orchestration (pipelines/): flows, schedules and their UI ----------------------------
# Prefect's home (profiles, local server SQLite DB, logs) lives under the project unless overridden.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
PREFECT_PORT ?= 4200
PREFECT_URL := http://127.0.0.1:$(PREFECT_PORT)
PREFECT_UP = $(BIN)/python -c "import urllib.request; urllib.request.urlopen('$(PREFECT_URL)/api/health', timeout=2)" 2>/dev/null
SET ?=
FLOW_ARGS ?=

.PHONY: flow schedule prefect-ui prefect-stop

flow: setup  ## training flow on the current params (make flow SET="train.epochs=5" FLOW_ARGS=--no-promote)
	@if [ -z "$$PREFECT_API_URL" ] && $(PREFECT_UP); then export PREFECT_API_URL=$(PREFECT_URL)/api; \
	  echo "reporting to the local Prefect server: $(PREFECT_URL)"; fi; \
	python -m pipelines training $(addprefix --set ,$(SET)) $(FLOW_ARGS)

prefect-ui: setup  ## start (or reuse) the local Prefect server in the background; UI on $(PREFECT_URL)
	@mkdir -p "$(PREFECT_HOME)"
	@if $(PREFECT_UP); then echo "Prefect server already running"; else \
	  PREFECT_UI_API_URL=$(PREFECT_URL)/api $(BIN)/python -c "import subprocess; print(subprocess.Popen(['prefect', 'server', 'start', '--host', '127.0.0.1', \
	    '--port', '$(PREFECT_PORT)'], stdin=subprocess.DEVNULL, stdout=open('$(PREFECT_HOME)/server.log', 'ab'), \
	    stderr=subprocess.STDOUT, start_new_session=True).pid)" > "$(PREFECT_HOME)/server.pid"; \
	  echo "starting the Prefect server (pid $$(cat "$(PREFECT_HOME)/server.pid"), log $(PREFECT_HOME)/server.log)"; \
	  for i in $$(seq 120); do $(PREFECT_UP) && break; sleep 1; done; \
	  $(PREFECT_UP) || { echo "the Prefect server did not start; see $(PREFECT_HOME)/server.log"; exit 1; }; fi
	@echo "Prefect UI: $(PREFECT_URL)   (API $(PREFECT_URL)/api; stop it with make prefect-stop)"

schedule: prefect-ui  ## serve the deployments (training/nightly on params.yaml schedule.cron, ...) on the local server
	@echo "serving training/nightly, promotion/manual, monitoring/daily, drift/hourly; Prefect UI: $(PREFECT_URL) (Ctrl-C stops serving)"
	@echo $$$$ > "$(PREFECT_HOME)/serve.pid"; PREFECT_API_URL=$(PREFECT_URL)/api exec python -m pipelines serve

prefect-stop:  ## stop what prefect-ui / schedule started: the serve process first (SIGTERM), then the server
	@python -m pipelines stop --prefect-home "$(PREFECT_HOME)"
