# dynft: the two commands of the README, and the pieces they are made of.
#   make run    install into .venv (first time) and run the daemon on its embedded default
#   make test   install into .venv (first time) and run ruff, mypy and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA_JARS := deploy/kafka/libs/.fetched

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The Kafka broker the tests start: its jars from Maven Central, once (deploy/kafka/libs is git-ignored).
$(KAFKA_JARS): deploy/kafka/pom.xml
	mvn -q -B -f deploy/kafka/pom.xml package
	touch $(KAFKA_JARS)

# Prometheus and promtool for tests/deploy, from Debian's `prometheus` package when missing.
.PHONY: deploy-tools
deploy-tools: $(VENV)/.deploy-tools
$(VENV)/.deploy-tools: deploy/install-tools.sh
	sh deploy/install-tools.sh
	mkdir -p $(VENV) && touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dynft run

lint: $(STAMP)
	$(BIN)/ruff check dynft tests benchmarks
	$(BIN)/ruff format --check dynft tests benchmarks
	$(BIN)/mypy

test: lint $(KAFKA_JARS) deploy-tools
	$(BIN)/pytest -n 2  # two workers: most slow tests wait on processes and brokers

bench: $(STAMP)
	$(BIN)/python -m benchmarks --suite quick

clean:
	rm -rf $(VENV) dynft-state dynft-kafka deploy/kafka/libs deploy/kafka/target .pytest_cache .mypy_cache .ruff_cache
