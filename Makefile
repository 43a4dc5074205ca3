# The two set-up commands of the README: `make train` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
RLQ := $(VENV)/bin/rlq
CONFIG ?= configs/tiny_arith_cpu.yaml
PYTEST_ARGS ?= -m "not slow"

.PHONY: install train test lint typecheck pytest test-full clean

install:
	bash scripts/install.sh

POLICY_DIR ?= artifacts/tiny-policy
DATA_DIR ?= data/arith

# The main job: the tiny CPU training run on arithmetic, end to end on this machine. The warm-started policy
# and the data are built once (cached by content hash) and reused by later runs.
train: install
	$(RLQ) build-policy --output-dir $(POLICY_DIR)
	$(RLQ) prepare-data --source arith --output-dir $(DATA_DIR)
	$(RLQ) train --config $(CONFIG) policy.model_name=$(POLICY_DIR) data.path=$(DATA_DIR) $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy broker/

pytest: install
	$(PY) -m pytest $(PYTEST_ARGS)

# What CI runs: lint, type check, and every test except the slow tier.
test: lint typecheck pytest

# Everything, slow suites included (full fault injection, long training).
test-full: PYTEST_ARGS=
test-full: test

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
