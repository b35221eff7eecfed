# Two commands on a fresh machine:
#   make demo   set up, then run the whole DVC pipeline on the embedded synthetic dataset
#   make test   set up, then run the test suite (what CI runs)
#
# Setting up installs the lock (LOCK: exact versions and hashes of everything but torch), then
# torch by version from its index (TORCH_SPEC / TORCH_INDEX_URL: pip keeps the locked versions of
# its requirements), then this package without dependencies, then `pip check`:
#   CPU laptop:   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#   V100 nodes:   make demo LOCK=requirements/cu126.txt TORCH_SPEC=torch==2.14.1 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# `make lock` rewrites both locks from pyproject.toml and requirements/torch.in (README,
# "Dependencies and why").
PYTHON ?= python3
VENV ?= .venv
LOCK ?= requirements/cpu.txt
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=
# The Python minor version of CI, of the image and of the locks.
PYTHON_MINOR := 3.11
# `make lock` resolves with uv in a venv of its own; LOCK_ARGS=--upgrade moves every pin.
UV_SPEC := uv==0.13.10
LOCK_VENV := .venv-lock
LOCK_ARGS ?=

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip prints a warning per package about an unused local index: hide that line only.
QUIET_PIP := { grep -v "is ignored: it is neither" || true; }

BIN := $(VENV)/bin
# Stages run `python -m stages.x` through DVC's shell: the venv must come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test lint lint-code lock clean-data

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, $(lastword $(subst ., ,$(PYTHON_MINOR)))))' \
		|| { echo "the locks are for Python $(PYTHON_MINOR): run with PYTHON=python$(PYTHON_MINOR)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	@echo "installing $(LOCK) (hashes checked), then $(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK) 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip check
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

# The cluster set first (it has every extra); the CPU set is held to its versions, so a package
# in both has one version. torch is left out of both: it comes from its own index by version.
UV_COMPILE = $(LOCK_VENV)/bin/uv pip compile -q pyproject.toml requirements/torch.in \
	--excludes <(echo torch) --generate-hashes --default-index https://pypi.org/simple \
	--python-version $(PYTHON_MINOR) --python-platform x86_64-manylinux_2_28 \
	--custom-compile-command "make lock" $(LOCK_ARGS)

$(LOCK_VENV)/bin/uv:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "$(UV_SPEC)" 2>&1 | $(QUIET_PIP)

lock: | $(LOCK_VENV)/bin/uv
	$(UV_COMPILE) --extra cluster --extra test -o requirements/cu126.txt
	$(UV_COMPILE) --extra test -c requirements/cu126.txt -o requirements/cpu.txt

clean-data:
	rm -rf data reports mlflow.db
