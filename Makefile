# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both build a fresh virtual environment in .venv from a bare machine.
# TORCH picks the torch build: the default is the CPU wheel CI uses; on a GPU box run
# e.g. `make demo TORCH=torch` to take your platform's default build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m hf_nvfp4.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check .
