# visionops: `make run` and `make test` set everything up on a fresh machine, then do their job.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false

.PHONY: help setup run test test-fast bench ui clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	@touch $@

setup: $(STAMP)  ## create .venv and install pinned dependencies (once)

run: setup  ## run the DVC pipeline (dvc repro) on the data source in params.yaml
	visionops check > /dev/null
	dvc repro

test: setup  ## run the whole test suite
	pytest

test-fast: setup  ## the suite without tests marked slow
	pytest -m "not slow"

bench: setup  ## benchmarks (see bench/README.md)
	cd bench && python bench_validate.py && python bench_train_throughput.py && python bench_make_run.py

MLFLOW_PORT ?= 5000
ui: setup  ## MLflow UI on http://127.0.0.1:$(MLFLOW_PORT) (runs, metrics, models)
	mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:  ## remove pipeline outputs and run state (keeps .venv)
	rm -rf data/dataset data/prepared reports .dvc/tmp
