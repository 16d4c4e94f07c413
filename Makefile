# Set-up and entry points. `make defend` and `make test` work on a fresh clone: they create
# .venv, install torch first (the CPU wheel 2.13.0; any other resolution pulls a CUDA build),
# then the project from its own files, every other version fixed by requirements.lock.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
LOCK := requirements.lock
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export KEDRO_DISABLE_TELEMETRY := true
export MPLBACKEND := Agg

.PHONY: install dev defend repro test test-fast lint lock clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -c $(LOCK) -e .
	touch $@

# dev: tests, ruff, import-linter; ops: DVC and kedro-airflow (tested too)
$(VENV)/.dev: $(VENV)/.installed
	$(PIP) -c $(LOCK) -e ".[dev,ops]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

## Defend the configured suspect model (the embedded tiny model by default).
defend: $(VENV)/.installed
	$(VENV)/bin/kedro run --pipelines=defend

## Reproduce reports/metrics.json through DVC's stages (kedro must be on PATH for them).
repro: $(VENV)/.dev
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro

## The whole test suite (CPU; GPU tests are skipped without a GPU).
test: $(VENV)/.dev
	$(VENV)/bin/pytest

## Everything but the end-to-end defence runs.
test-fast: $(VENV)/.dev
	$(VENV)/bin/pytest -m "not slow"

## ruff, and the layering contracts (library / integrations / pipelines) with import-linter.
lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

## Regenerate requirements.lock from a fresh resolution of .[dev,ops] (minutes; needs the registries).
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet torch==2.13.0 && .lock-venv/bin/python -m pip install --quiet -e ".[dev,ops]"
	(sed -n 1,3p $(LOCK); .lock-venv/bin/pip freeze --exclude-editable | grep -v -i "^torch==\|^beear") > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv

clean:
	rm -rf data/02_intermediate/* data/03_primary/* data/06_models/* data/08_reporting/* data/runs reports/plots mlflow.db mlruns
