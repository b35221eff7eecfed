# Two commands on a fresh machine:
#   make demo   set up, then run the whole DVC pipeline on the embedded synthetic dataset
#   make test   set up, then run the test suite (what CI runs)
#
# TORCH_SPEC / TORCH_INDEX_URL choose the torch build installed before everything else:
#   CPU laptop:   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#   V100 nodes:   make demo TORCH_SPEC='torch==2.14.*' TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip prints a warning per package about an unused local index: hide that line only.
QUIET_PIP := { grep -v "is ignored: it is neither" || true; }

BIN := $(VENV)/bin
# Stages run `python -m stages.x` through DVC's shell: the venv must come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test lint lint-code clean-data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q -e ".[test]" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pipeline.media --check
	touch $@

setup: $(VENV)/.installed
	@test -d .dvc || $(BIN)/dvc init -q

demo: setup
	$(BIN)/dvc repro

test: setup lint-code
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup lint-code

lint-code:
	$(BIN)/ruff check pipeline stages tests bench
	$(BIN)/ruff format --check pipeline stages tests bench

clean-data:
	rm -rf data reports mlflow.db
