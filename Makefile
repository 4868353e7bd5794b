# Flywheel: `make demo` and `make test` work from a fresh clone; everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DAYS ?= 7
KEEP ?= 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export GX_ANALYTICS_ENABLED := false

.PHONY: demo test test-fast lint down up clean venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/flywheel demo --days $(DAYS) $(if $(filter 0,$(KEEP)),--no-keep,--keep)

up: venv
	$(BIN)/flywheel up

down:
	@if [ -x $(BIN)/flywheel ]; then $(BIN)/flywheel down; fi

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: venv
	$(BIN)/ruff check .

clean: down
	rm -rf .flywheel
