# Two commands on a fresh machine (see README):
#   make demo   generate the default descriptor (llama) and verify it end to end on a tiny model
#   make test   run the test suite
# Both create .venv on first use, installing torch first from constraints.txt (a CPU build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= llama

.PHONY: demo test check bench clean-venv

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/puzzle-gen generate $(MODEL)
	$(VENV)/bin/puzzle-gen verify $(MODEL)

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup

check: $(STAMP)
	$(VENV)/bin/puzzle-gen check

bench: $(STAMP)
	$(PY) bench/bench_weight_groups.py
	$(PY) bench/bench_jobs.py
	$(PY) bench/bench_load_model.py

clean-venv:
	rm -rf $(VENV)
