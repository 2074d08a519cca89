# Two commands on a fresh machine (see README):
#   make demo   generate the default descriptor (llama) and verify it end to end on a tiny model
#   make test   run the test suite
#   make test-modelopt   create .venv-modelopt (Model Optimizer 0.47, its transformers range)
#                        and run the tests that need Model Optimizer
# Both create .venv on first use, installing torch first from constraints.txt (a CPU build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= llama

.PHONY: demo test check bench clean-venv test-modelopt

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/puzzle-gen generate $(MODEL)
	$(VENV)/bin/puzzle-gen verify $(MODEL)

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup --durations=15

check: $(STAMP)
	$(VENV)/bin/puzzle-gen check

bench: $(STAMP)
	$(PY) bench/bench_weight_groups.py
	$(PY) bench/bench_jobs.py
	$(PY) bench/bench_load_model.py
	$(PY) bench/bench_oracle.py

clean-venv:
	rm -rf $(VENV)

# NVIDIA Model Optimizer's environment: its own transformers (inside Model Optimizer's range),
# so a venv of its own. MO_TYPES="llama gpt2 ..." limits the per-type tests to those types
# (CI runs a sample; the default is every type the default target verifies).
MO_VENV ?= .venv-modelopt
MO_CONSTRAINTS ?= constraints-modelopt.txt
MO_PY := $(MO_VENV)/bin/python
MO_STAMP := $(MO_VENV)/.installed
MO_TYPES ?=

$(MO_STAMP): pyproject.toml setup.py $(MO_CONSTRAINTS)
	$(PYTHON) -m venv $(MO_VENV)
	$(MO_PY) -m pip install --quiet -c $(MO_CONSTRAINTS) torch
	$(MO_PY) -m pip install --quiet -c $(MO_CONSTRAINTS) -e '.[modelopt,test]'
	touch $(MO_STAMP)

test-modelopt: $(MO_STAMP)
	PUZZLE_GEN_MO_TYPES="$(MO_TYPES)" $(MO_PY) -m pytest -q -n auto --dist loadgroup tests/test_modelopt_api.py
