# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

# --- emulators (Azurite from npm; moto and fake-gcs-server come from PyPI) ---
# npm refuses to install azurite into a folder named "azurite".
AZURITE_DIR := .tools/azurite-npm
AZURITE := $(AZURITE_DIR)/node_modules/.bin/azurite-blob
AZURITE_VERSION ?= 3.35.0

.PHONY: demo test test-fast test-long test-seeds bench docs dist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e ".[test,docs]"
	touch $@ $(VENV)/.installed-demo

# The benchmark's plot (matplotlib), on top of the test extras.
$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e ".[test,bench]"
	touch $@

# build and twine (the `dist` extra) for `make dist`.
$(VENV)/.installed-dist: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e ".[dist]"
	touch $@

$(AZURITE):
	mkdir -p $(AZURITE_DIR)
	cd $(AZURITE_DIR) && npm install --silent --no-audit --no-fund --no-save azurite@$(AZURITE_VERSION)

demo: $(VENV)/.installed-demo
	$(BIN)/python examples/quickstart.py

test: $(VENV)/.installed-test $(AZURITE)
	KERAS_CKPT_AZURITE=$(abspath $(AZURITE)) $(BIN)/python -m pytest tests

# Everything but the slow end-to-end tests; `make test` runs them all.
test-fast: $(VENV)/.installed-test $(AZURITE)
	KERAS_CKPT_AZURITE=$(abspath $(AZURITE)) $(BIN)/python -m pytest tests -m "not slow"

# The whole fault matrix (tests/test_fault_matrix.py): every step of the commit
# protocol and every network fault on every store; `make test` runs a few cells.
test-long: $(VENV)/.installed-test $(AZURITE)
	KERAS_CKPT_FULL_MATRIX=1 KERAS_CKPT_AZURITE=$(abspath $(AZURITE)) $(BIN)/python -m pytest tests/test_fault_matrix.py

# The randomized exactness tests (a random kill batch drawn from
# KERAS_CKPT_TEST_SEED) over many seeds: `make test-seeds SEEDS="1 2 3"`.
SEEDS ?= 1 2 3 4 5 6 7 8 9 10
test-seeds: $(VENV)/.installed-test $(AZURITE)
	for seed in $(SEEDS); do \
	  KERAS_CKPT_TEST_SEED=$$seed KERAS_CKPT_AZURITE=$(abspath $(AZURITE)) $(BIN)/python -m pytest -q \
	    tests/test_exactness.py tests/test_everyday_jobs.py tests/test_custom_loop.py \
	    tests/test_distributed.py::test_mirrored_sigkill_and_resume_is_bitwise_exact || exit 1; \
	done

# `make bench BENCH_HOST=cpu` (or accel) for one host mode; BENCH_ARGS adds
# run.py options (e.g. BENCH_ARGS="--wait-idle 60").
BENCH_HOST ?= both
BENCH_ARGS ?=
bench: $(VENV)/.installed-test $(VENV)/.installed-bench $(AZURITE)
	$(BIN)/python benchmarks/run.py --host $(BENCH_HOST) $(BENCH_ARGS)
	KERAS_CKPT_AZURITE=$(abspath $(AZURITE)) $(BIN)/python benchmarks/mirror.py
	$(BIN)/python benchmarks/resume.py --replay

docs: $(VENV)/.installed-test
	$(BIN)/mkdocs build --strict

# The sdist and the wheel in dist/, then `twine check` (what PyPI checks on upload).
dist: $(VENV)/.installed-dist
	rm -rf dist
	$(BIN)/python -m build --quiet --outdir dist .
	$(BIN)/python -m twine check --strict dist/*

clean:
	rm -rf $(VENV) .tools checkpoints export site dist build
