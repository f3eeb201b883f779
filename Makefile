# Developer entry points. `make test` works from a fresh clone on a CPU-only machine: it creates .venv, installs the
# package with its dev extras at the tested versions of requirements/lock.txt (torch pinned to the CPU build in the
# same pip command) and runs the test suite but its slow tests (learning, multi-process, crash; `make test-slow` runs
# those, and CI runs both). `make test-latest` runs the whole suite in .venv-latest with the newest versions
# pip resolves today (torch keeps its CPU pin), `make test-lowest` with the floors of pyproject.toml
# (requirements/lowest.txt); `make lock` rewrites requirements/lock.txt from the newest environment.
# `make test-peers` runs the peers' own test suites (transformers' model, config, processor and image-processor
# mixins, PEFT's tester) and the lmms-eval and TRL contract tests against lavit: it downloads the test files of the
# installed versions from the package index into .peers/ (git-ignored, never vendored) and adds lmms-eval to the
# environment (requirements/peers*.txt: without its ~45 dependencies, with the few its model and task API import);
# `PEERS_VENV=.venv-latest make test-peers` runs them on the newest.
VENV ?= .venv
LATEST_VENV ?= .venv-latest
LOWEST_VENV ?= .venv-lowest
PYTHON := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
LOCK := requirements/lock.txt

PEERS_VENV ?= $(VENV)

.PHONY: install test test-slow test-peers test-latest test-lowest lock lint bench demo

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -c $(LOCK) "$(TORCH_PIN)" -e ".[dev]"
	touch $@

$(LATEST_VENV)/.installed: pyproject.toml
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager "$(TORCH_PIN)" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/lavit demo --output lavit-demo

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not slow" --ignore=tests/peers

$(PEERS_VENV)/.peers-installed: $(PEERS_VENV)/.installed requirements/peers.txt requirements/peers-no-deps.txt
	$(PEERS_VENV)/bin/python -m pip install --quiet --no-warn-conflicts --no-deps -r requirements/peers-no-deps.txt
	$(PEERS_VENV)/bin/python -m pip install --quiet --no-warn-conflicts "$(TORCH_PIN)" -r requirements/peers.txt
	touch $@

test-peers: $(PEERS_VENV)/.peers-installed
	$(PEERS_VENV)/bin/python tests/peers/download_peer_tests.py --cache .peers
	HF_HUB_OFFLINE=1 $(PEERS_VENV)/bin/python -m pytest -q -rs tests/peers tests/evaluation/test_lmms_eval_model.py

test-slow: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m slow --ignore=tests/peers --durations=15

$(LOWEST_VENV)/.installed: pyproject.toml requirements/lowest.txt
	python3 -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet -c requirements/lowest.txt "$(TORCH_PIN)" -e ".[dev]"
	touch $@

test-lowest: $(LOWEST_VENV)/.installed
	HF_HUB_OFFLINE=1 $(LOWEST_VENV)/bin/python -m pytest -q

test-latest: $(LATEST_VENV)/.installed
	HF_HUB_OFFLINE=1 $(LATEST_VENV)/bin/python -m pytest -q

lock: $(LATEST_VENV)/.installed
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^lavit' > $(LOCK)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PYTHON) benchmarks/bench_tokenizer.py
