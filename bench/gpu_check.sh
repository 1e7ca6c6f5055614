#!/usr/bin/env bash
# The first-GPU check, one command (docs/gpu.md):
#
#   bash bench/gpu_check.sh              # on the GPU machine, with bench_output/gpu_wheels carried
#   bash bench/gpu_check.sh --dry-run    # here, on CPU at a tiny shape (no install), well under a minute
#
# Installs the carried wheels the machine lacks, runs the CUDA tests, a `--device cuda` streaming
# merge and the resident candidate benchmark on a 7B-shaped synthetic model against the HBM copy
# floor, and prints one table (also to $OUT/gpu_check.txt when $OUT is set). Every step has its own
# time limit inside an overall budget (--budget, default 450 s); GPU_CHECK_HARD_LIMIT (default
# 480 s) is a hard stop around everything. Other options: python3 bench/gpu_check.py --help.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ "$dry" = 1 ] && [ -x .venv/bin/python ]; then
    py=.venv/bin/python          # here: the project's venv
else
    py=python3                   # the GPU machine's interpreter (torch, transformers, numba there)
fi
# SIGTERM first (the driver stops the running step and still prints its table), SIGKILL 10 s later
exec timeout -k 10 "${GPU_CHECK_HARD_LIMIT:-480}" "$py" bench/gpu_check.py "$@"
