# The README's two commands: `make run` (the main job) and `make test` (the test suite).
# Both create .venv on first use (CPU torch from constraints.txt) and reuse it afterwards.
#   make run ARGS="freeze=none trainer.max_epochs=5"     # Hydra overrides for the job
#   make test PYTEST_ARGS="-m 'not slow'"                # pytest arguments
#   VENV=/path/to/venv make test                         # reuse another virtual environment

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
# e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for the CPU-only torch wheel
TORCH_PIP_ARGS ?=
# The install stamp is keyed by the content of the files that decide what gets installed, so a
# copy of the checkout with different mtimes does not reinstall, and any edit to them does.
SETUP_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.lightning-freeze-setup-$(SETUP_HASH)

.PHONY: setup run test bench lint format clean

setup: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 -c constraints.txt $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e '.[dev,bench]' -c constraints.txt
	@rm -f $(VENV)/.lightning-freeze-setup-*
	@touch $@

run: setup
	$(PY) -m lightning_freeze $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks --quick

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf outputs multirun lightning_logs dist build .pytest_cache .ruff_cache
