# Quick start: `make demo` runs the fine-tuning job, `make test` runs the tests.
# Both create .venv on first use and install the package editable with its dev extras,
# pinned by constraints-dev.txt.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench wheel clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	# torch first: the editable install below builds against it without build isolation.
	$(PIP) install -q -c constraints-dev.txt torch torchvision setuptools wheel ninja
	$(PIP) install -q -c constraints-dev.txt --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) python/finetune.py

test: $(STAMP)
	$(PY) -m pytest -q --benchmark-disable

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
