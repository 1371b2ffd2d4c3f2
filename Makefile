# The two commands a newcomer needs: `make run` and `make test`.
# Both create .venv with the Python 3.11 they find and install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := -e libs/common[local] -e services/gateway -e services/conversation \
            -e services/lead -e services/llm-proxy -e services/monitor -e tools/loadtest

.PHONY: install run test lint typecheck bench clean

$(STAMP): requirements/constraints.txt requirements/dev.txt libs/common/pyproject.toml services/*/pyproject.toml \
          tools/loadtest/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/constraints.txt $(PACKAGES) -r requirements/dev.txt
	touch $(STAMP)

install: $(STAMP)

## Start the whole system: local NATS, Postgres and Redis (unless URLs are configured), migrations, five services.
run: $(STAMP)
	$(BIN)/orbion up

## Run the whole test suite against real NATS, Postgres and Redis.
test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/orbion bench

clean:
	rm -rf $(VENV) .orbion
