# One entry point for newcomers: `make demo` runs the main job, `make test` runs the tests.
# Both set up the environment first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test-data test test-fast lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

# Real data some tests train on (Fashion-MNIST from Debian; idempotent, needs root or sudo for apt-get).
test-data:
	bash scripts/get_offline_data.sh fashion_mnist

test: setup test-data
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: setup
	$(BIN)/ruff check micro_diffusion tests benchmarks scripts train.py

demo: setup
	$(BIN)/python -m micro_diffusion.cli demo

bench: setup
	$(BIN)/python benchmarks/dit_step.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
