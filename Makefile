# Set-up and entry points. `make defend` and `make test` work on a fresh clone: they create
# .venv, install torch first (the CPU wheel 2.13.0; any other resolution pulls a CUDA build),
# then the project from its own files.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export KEDRO_DISABLE_TELEMETRY := true
export MPLBACKEND := Agg

.PHONY: install dev defend repro test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

## Defend the configured suspect model (the embedded tiny model by default).
defend: $(VENV)/.installed
	$(VENV)/bin/kedro run --pipeline=defend

## Reproduce reports/metrics.json through DVC's stages (kedro must be on PATH for them).
repro: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro

## The whole test suite (CPU; GPU tests are skipped without a GPU).
test: $(VENV)/.dev
	$(VENV)/bin/pytest

## Everything but the end-to-end defence runs.
test-fast: $(VENV)/.dev
	$(VENV)/bin/pytest -m "not slow"

clean:
	rm -rf data/02_intermediate/* data/03_primary/* data/06_models/* data/08_reporting/* reports/plots mlflow.db mlruns
