# Developer entry points. `make test` works from a fresh clone on a CPU-only machine: it creates .venv, installs the
# package with its dev extras (torch pinned to the CPU build in the same pip command) and runs the test suite.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: install test lint bench demo

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet "$(TORCH_PIN)" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/lavit demo --output lavit-demo

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PYTHON) benchmarks/bench_tokenizer.py
