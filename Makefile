# dynft: the two commands of the README, and the pieces they are made of.
#   make run    install into .venv (first time) and run the daemon on its embedded default
#   make test   install into .venv (first time) and run ruff, mypy and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dynft run

lint: $(STAMP)
	$(BIN)/ruff check dynft tests benchmarks
	$(BIN)/ruff format --check dynft tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks --suite quick

clean:
	rm -rf $(VENV) dynft-state .pytest_cache .mypy_cache .ruff_cache
