# Two commands on a fresh clone: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Rebuilt only when the dependency declarations change: `make setup` is a no-op otherwise.
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: any looser requirement would pull GBs of CUDA wheels.
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	# numba's kernels compiled once here, into its on-disk cache: no JIT pause in a first merge
	$(PY) -m merge_engine.methods.fused
	touch $(STAMP)

test: setup
	$(OFFLINE) $(PY) -m pytest tests -q

demo: setup
	$(OFFLINE) $(PY) experiments/quickstart/run.py

bench: setup
	$(OFFLINE) $(PY) bench/merge_throughput.py

clean:
	rm -rf $(VENV) demo_output bench_output .pytest_cache
