# The two set-up commands of the README: `make train` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
RLQ := $(VENV)/bin/rlq
CONFIG ?= configs/tiny_arith_cpu.yaml
# Every test, the slow tier last and fastest first, each slow test with its own time limit, inside the CI budget
# (tests/ci_plan.py, tests/ci_plan.json). `make test-fast` leaves the slow tier out.
PYTEST_ARGS ?= -p tests.ci_plan --durations=50

.PHONY: install train test test-fast lint typecheck pytest clean

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

# What CI runs (.ci/run): lint, type check, and every test that fits the CI budget (about 45 minutes on 2 cores).
test: lint typecheck pytest

# The quick tier only (about 15 minutes on 2 cores): no real-engine suites, no long fault scenarios.
test-fast: PYTEST_ARGS=-m "not slow"
test-fast: test

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
