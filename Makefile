# The two commands: `make demo` (set up, then run the built-in demo) and `make test` (set up, then the tests).
# Setup is part of both: a virtual environment in .venv with this project installed (editable).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the CPU build of torch first (a plain `pip install torch` pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-gpu clean

setup: $(VENV)/.installed
	@# The code reward's sandbox needs bubblewrap: installed quietly when missing and possible (root, apt-get).
	@# Never fails setup: without it code rewards refuse to run (unless sandbox: unsafe) and its tests skip.
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1; }; }; } || \
	  echo "setup: bubblewrap (bwrap) is missing and was not installed (needs root and apt-get):" \
	    "code rewards will refuse to run unless kwargs.sandbox: unsafe"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m jobs.demo

test: setup
	TRITON_INTERPRET=1 RAY_TRAIN_V2_ENABLED=1 $(PY) -m pytest -q -m "not gpu" --timeout=900 --durations=25 $(PYTEST_ARGS) tests

# On the GPU machine (see docs/benchmarks.md): the same tests at real sizes in bf16.
test-gpu:
	RAY_TRAIN_V2_ENABLED=1 $(PY) -m pytest -q -m gpu $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) runs .pytest_cache
