# The two commands a fresh clone needs: `make demo` and `make test`.
# Both create .venv and install the project into it on first use.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: demo test test-random lint bench kafka
.DEFAULT_GOAL := test

# Installing compiles streams/core.py (mypyc): a change to it rebuilds.
$(BIN)/.installed: pyproject.toml setup.py streams/core.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/ledger demo

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
