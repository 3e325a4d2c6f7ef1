# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both build a virtual environment in .venv from a bare machine.
# The torch build is part of the environment's identity: TORCH is the requirement (default
# `torch`, the newest build your pip index offers: on Linux from PyPI the CUDA build, which
# also runs on a CPU) and TORCH_INDEX an optional index for torch alone, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu     (CPU-only, about 200 MB)
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128   (a given CUDA version)
#   make test TORCH=torch==2.13.0                                  (a given version)
# Changing either reinstalls torch in the existing .venv.
PYTHON ?= python3
TORCH ?= torch
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CHOICE := $(TORCH)$(if $(TORCH_INDEX), from $(TORCH_INDEX))

.PHONY: setup demo test lint FORCE

# Rewritten only when the choice differs from the installed one, so make sees it as changed.
$(VENV)/torch-choice.txt: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_CHOICE)' | cmp -s - $@ || echo '$(TORCH_CHOICE)' > $@

$(VENV)/.torch-installed: $(VENV)/torch-choice.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip uninstall -q -y torch >/dev/null 2>&1 || true
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch-installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m hf_nvfp4.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n auto --maxprocesses 4 tests

lint: setup
	$(PY) -m ruff check .
