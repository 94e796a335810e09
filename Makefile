# mtkernels: `make demo` (set up, then the main job on real data) and `make test` (set up, then the
# tests). Both create .venv with the pinned requirements (torch 2.13.0 CPU) and build the extension.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
DATA   ?= .cache/data
export MAX_JOBS ?= 2
export MTKERNELS_DATA := $(abspath $(DATA))

.PHONY: all setup build data demo test bench clean

all: test

$(DEPS): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(DEPS)

# Incremental (ninja); then an editable install so the `mtkernels` command exists.
build: $(DEPS)
	$(PY) setup.py -q build_ext --inplace
	@$(PY) -m pip show -q mtkernels >/dev/null 2>&1 || \
	  $(PY) -m pip install -q --no-deps --no-build-isolation --config-settings editable_mode=compat -e . >/dev/null
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

clean:
	rm -rf build *.egg-info mtkernels/*.so .pytest_cache
