# Every target creates the environment it needs from the project's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The test/demo environment pins the local CPU build of torch; the package itself does not.
TORCH_PIN := torch==2.13.0

.PHONY: env demo test lint typecheck unit bench clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_PIN)"
	touch $@

env: $(VENV)/.ready

demo: env
	$(VENV)/bin/handloom run --accelerator cpu --devices 2 --strategy ddp examples/train_classifier.py --epochs 3

lint: env
	$(VENV)/bin/ruff check src tests examples benchmarks tools
	$(VENV)/bin/ruff format --check src tests examples benchmarks tools

typecheck: env
	$(VENV)/bin/mypy

test: env lint typecheck
	$(PY) -m pytest -q

unit: env
	$(PY) -m pytest -q tests/unit

bench: env
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
