# The two commands a fresh clone needs: `make demo` and `make test`.
# Both create .venv and install the project into it on first use.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: demo serve test test-random lint lock bench kafka
.DEFAULT_GOAL := test

# Every dependency comes from requirements.lock, each file checked against its hash
# (regenerate it after changing pyproject.toml: make lock). Installing compiles
# streams/core.py (mypyc) with the locked mypy and setuptools: a change to it rebuilds.
$(BIN)/.installed: requirements.lock pyproject.toml setup.py streams/core.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

lock:
	$(PYTHON) -m venv $(VENV)-lock && $(VENV)-lock/bin/pip install -q pip-tools==7.7.0
	PIP_FIND_LINKS= $(VENV)-lock/bin/pip-compile -q --generate-hashes --allow-unsafe \
	  --extra worker --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
	  -o requirements.lock pyproject.toml

demo: $(BIN)/.installed
	$(BIN)/ledger demo

serve: $(BIN)/.installed
	$(BIN)/ledger demo --serve

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# The whole suite in a random order (every test alone in its module's company or not):
# make test-random SEED=1234 repeats an order.
SEED ?= $(shell date +%s)
test-random: $(BIN)/.installed
	$(BIN)/python -m pytest --random-order-bucket=global --random-order-seed=$(SEED)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

kafka: $(BIN)/.installed
	$(BIN)/ledger kafka up
