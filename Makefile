# Two commands on a fresh clone: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Rebuilt only when the dependency declarations change: `make setup` is a no-op otherwise.
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: setup test demo bench clean lock

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

# Regenerates constraints.txt: a fresh temporary venv, torch first (as in setup), then the package
# with its dev extras and NO constraints (so pip resolves the newest allowed versions), then
# `pip freeze`. Review the diff, run `make setup test`, commit constraints.txt when green.
lock:
	@set -e; tmp=$$(mktemp -d /tmp/evomerge-lock.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; pip="$$tmp/venv/bin/pip"; \
	$$pip install -q $(TORCH) || $$pip install -q $(TORCH) --index-url https://download.pytorch.org/whl/cpu; \
	PIP_CONSTRAINT= $$pip install -q -e '.[dev]'; \
	{ echo "# Every package (direct and transitive) at the version CI passed with. Generated, do not edit:"; \
	  echo "# \`make lock\` makes a fresh venv, installs $(TORCH), then -e '.[dev]' without constraints,"; \
	  echo "# and writes \`pip freeze\` here (torch without its local +cpu tag, so it matches any index)."; \
	  echo "# Refresh: make lock && make setup test, then commit this file."; \
	  echo "# Made $$(date -u +%Y-%m-%d) with $$($$tmp/venv/bin/python -c 'import sys, platform; print(f"Python {sys.version.split()[0]} on {platform.system()} {platform.machine()}")')."; \
	  $$pip freeze --exclude-editable | grep -v '^evomerge' | sed -E 's/^torch==.*/$(TORCH)/'; } > constraints.txt.new; \
	mv constraints.txt.new constraints.txt; echo "constraints.txt: $$(grep -vc '^#' constraints.txt) packages pinned"
