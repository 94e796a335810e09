# mtkernels: `make demo` (set up, then the main job on real data) and `make test` (set up, then the
# tests). Both create .venv with the pinned requirements (torch 2.13.0 CPU) and build the extension.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
DATA   ?= .cache/data
export MAX_JOBS ?= 2
export MTKERNELS_DATA := $(abspath $(DATA))

.PHONY: all setup build data demo test bench clean test-cuda-build

all: test

$(DEPS): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(DEPS)

# First time: an editable install (builds the extension once and puts the `mtkernels` command in
# .venv/bin); afterwards an incremental in-place rebuild (ninja) of what changed.
build: $(DEPS)
	@if $(PY) -m pip show -q mtkernels >/dev/null 2>&1; then \
	  $(PY) setup.py -q build_ext --inplace; \
	else \
	  $(PY) -m pip install -q --no-deps --no-build-isolation --config-settings editable_mode=compat -e .; \
	fi
	$(PY) -c "import json, mtkernels; print(json.dumps(mtkernels.info()))"

# MovieLens-100K as RecBole ships it (read from the recbole==1.2.1 wheel, never imported).
data: $(DEPS)
	$(PY) -m mtkernels.data.fetch --dest $(DATA)

test: build data
	MTKERNELS_STRICT=1 MTKERNELS_REQUIRE_NATIVE=1 $(PY) -m pytest -q tests

demo: build data
	$(PY) -m mtkernels demo --out outputs/demo

bench: build
	$(PY) -m benchmarks.run all

# CUDA build check (no GPU needed): compile and link the CUDA kernels against a CUDA build of torch
# in its own venv and a copy of the tree (the CPU build's .so stays untouched), check that the
# build reports CUDA, then run the test suite on it (GPU tests skip without a GPU).
CUDA_VENV  := .venv-cuda
CUDA_PY    := $(abspath $(CUDA_VENV))/bin/python
CUDA_DEPS  := $(CUDA_VENV)/.deps-installed
CUDA_TREE  := .cache/cuda-build
CUDA_TORCH ?= torch==2.14.1
# The nvcc on PATH may be a wrapper script: torch's guess of CUDA_HOME from it fails to link cudart.
CUDA_TOOLKIT ?= /usr/local/cuda-13.0
# What runs on the CUDA build (the whole suite by default; GPU tests skip without a GPU).
CUDA_TESTS ?= tests

$(CUDA_DEPS): requirements.txt
	$(PYTHON) -m venv $(CUDA_VENV)
	grep -v '^torch==' requirements.txt > $(CUDA_VENV)/requirements-no-torch.txt
	$(CUDA_VENV)/bin/python -m pip install -q --disable-pip-version-check "$(CUDA_TORCH)" -r $(CUDA_VENV)/requirements-no-torch.txt
	touch $@

test-cuda-build: $(CUDA_DEPS) data
	mkdir -p $(CUDA_TREE)
	find $(CUDA_TREE) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	git ls-files -z --cached --others --exclude-standard | \
	  tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C $(CUDA_TREE)
	cd $(CUDA_TREE) && CUDA_HOME=$(CUDA_TOOLKIT) TORCH_CUDA_ARCH_LIST="9.0+PTX" FORCE_CUDA=1 \
	  $(CUDA_PY) setup.py -q build_ext --inplace
	cd $(CUDA_TREE) && MTKERNELS_REQUIRE_NATIVE=1 $(CUDA_PY) -c "import json, mtkernels; i = mtkernels.info(); \
	  print(json.dumps(i)); assert i['cuda_built'], 'CUDA kernels not built in'; \
	  missing = [op for op, d in i['ops'].items() if 'cuda' not in d and op not in i['cpu_only_ops']]; assert not missing, f'no CUDA kernel: {missing}'"
	cd $(CUDA_TREE) && MTKERNELS_SHARED_DATA=$(abspath ../shared/data) $(CUDA_PY) -m pytest -q $(CUDA_TESTS)

clean:
	rm -rf build *.egg-info mtkernels/*.so .pytest_cache
