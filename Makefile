# The two commands of the README: `make demo` (main job) and `make test` (the tests).
# Each one sets up ./.venv first (created if missing, re-used if present).
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test test-lerobot test-rlds test-fast lint format clean

setup:
	@scripts/setup.sh

demo: setup
	$(BIN)/vlatune demo

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the LeRobot library loads our v2.1 / v3.0 output (side environments: ~6 GB, 3 min once)
test-lerobot: setup
	@scripts/setup_lerobot.sh
	$(BIN)/python -m pytest tests/test_lerobot_compat.py $(PYTEST_ARGS)

# TensorFlow Datasets loads our RLDS output and we read what it writes (side env .venv-rlds: ~2 GB)
test-rlds: setup
	@scripts/setup_rlds.sh
	$(BIN)/python -m pytest tests/test_rlds_compat.py $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not sim and not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
