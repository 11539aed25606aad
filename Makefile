# Two set-up commands (see README): `make up` and `make test`. Each creates .venv on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint typecheck unit bench jepsen clean

$(STAMP): pyproject.toml
	@$(PY) -c "import sys; assert sys.version_info >= (3, 11), sys.version" 2>/dev/null || { echo "error: Python 3.11+ is required (found: $(PY))"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job: a local agentcluster on this machine. Pass ARGS="--duration 5" to stop by itself.
up: $(STAMP)
	$(BIN)/agentcluster up $(ARGS)

# The whole test suite: lint, format check, types, then every test (slow ones included).
test: $(STAMP) lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/agentcluster bench runtime --json

# A longer Jepsen-style sweep of the raft store than the 300 seeds of the test run.
jepsen: $(STAMP)
	cd tests && ../$(BIN)/python jepsen_harness.py --seeds 300-2300 --voters 3
	cd tests && ../$(BIN)/python jepsen_harness.py --seeds 100-1100 --voters 5

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
