# Flywheel: `make demo` and `make test` work from a fresh clone; everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DAYS ?= 7
KEEP ?= 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export GX_ANALYTICS_ENABLED := false

.PHONY: demo test test-fast lint down up clean venv sysdeps bench

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

# Debian packages the tests and benches drive: headless Chromium (reports as a person sees them), wrk (load).
SYSDEPS := chromium wrk
sysdeps:
	@missing=$$(for p in $(SYSDEPS); do command -v $$p >/dev/null || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test: venv sysdeps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra --durations=25

test-fast: venv sysdeps
	$(BIN)/python -m pytest -q -ra -m "not slow"

bench: venv sysdeps
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/collect.py --validate
	$(BIN)/python bench/incremental.py

lint: venv
	$(BIN)/ruff check .

clean: down
	rm -rf .flywheel
