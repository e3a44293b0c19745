# The README's two commands: `make demo` and `make test`. Each creates .venv when missing.
# `make docs` builds the documentation into docs/_build/html (every warning an error);
# `make notebooks` executes the notebooks/*.py scripts and writes their .ipynb with the outputs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck pytest docs notebooks bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.docs-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $@

# The test suite builds the docs and executes the notebooks: it installs what they need too.
# psgd-jax (tests/test_psgd_kron.py's reference) pins optax<=0.2.6: its own environment, on our jax; kron-torch
# lists triton, which it does not use on CPU: installed without its dependencies.
$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,demo,docs]'
	$(BIN)/python -m venv $(VENV)/ref-psgd
	$(VENV)/ref-psgd/bin/python -m pip install --quiet psgd-jax==0.2.9 optax==0.2.6 chex==0.1.92 flax==0.12.8 jax==0.10.2 jaxlib==0.10.2 numpy==2.4.6
	$(BIN)/python -m pip install --quiet --no-deps kron-torch==0.3.3
	touch $@ $(VENV)/.demo-installed $(VENV)/.docs-installed

demo: $(VENV)/.demo-installed
	$(BIN)/python -m benchmarks.demo

lint: $(VENV)/.test-installed
	$(BIN)/ruff format --check adaopt tests benchmarks notebooks docs
	$(BIN)/ruff check adaopt tests benchmarks notebooks docs

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

pytest: $(VENV)/.test-installed
	$(BIN)/python -m pytest -n 2 --dist worksteal

test: lint typecheck pytest

docs: $(VENV)/.docs-installed
	$(BIN)/python -m sphinx -W --keep-going -b html -d docs/_build/doctrees docs docs/_build/html

notebooks: $(VENV)/.test-installed
	$(BIN)/python -m tests.test_notebooks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache docs/_build
