# Quickstart: `make train` (set up and train the default recipe, digits_mlp) and `make test` (set up and run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# SuperGradients' wheel, only read by the tests (its recipe YAML files, byte for byte); never installed, never committed.
SG_WHEEL := .cache/super_gradients-3.7.1-py3-none-any.whl

.PHONY: setup dev train test bench clean

# torch is installed first and pinned, so pip never resolves the multi-GB CUDA build from a bare `torch` requirement.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e ".[data]"
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

dev: $(VENV)/.dev-installed $(SG_WHEEL)

$(SG_WHEEL): | $(BIN)/python
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --dest .cache super-gradients==3.7.1

train: setup
	$(BIN)/super-trainer

test: dev
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/checkpoint_stall.py

clean:
	rm -rf $(VENV) checkpoints .pytest_cache .cache
