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

# Every offline dataset the tests read (Fashion-MNIST and clip art from Debian, emoji from npm, npm itself from
# Debian when missing), so no source test is skipped; idempotent, needs root or sudo for apt-get.
test-data:
	bash scripts/get_offline_data.sh emoji fashion_mnist clipart

test: setup test-data
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: setup
	$(BIN)/ruff check micro_diffusion tests benchmarks scripts train.py

demo: setup
	$(BIN)/python -m micro_diffusion.cli demo --pipeline yamls/demo.yaml

bench: setup
	$(BIN)/python benchmarks/dit_step.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
