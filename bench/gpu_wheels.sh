#!/usr/bin/env bash
# Download (here, where a package index is reachable) the wheels that bench/gpu_check.sh installs on
# a bare GPU machine (Python 3.12, torch with CUDA, transformers, numba, safetensors; no index).
#
#   bash bench/gpu_wheels.sh [--dest DIR] [--python-version 3.12] [--no-transformers]
#
# DIR (default bench_output/gpu_wheels, ignored by git) is emptied first, so it holds exactly one
# version of each package. Carry it to the GPU machine with the working tree. docs/gpu.md says why
# each wheel is here; gpu_check.sh installs a wheel only where the machine lacks the package or has
# an older version (the transformers group only when the machine's transformers is not 5.x).
#
# The pins are the versions of the CI venv (.venv) the engine is tested with. --python-version
# picks the interpreter the binary wheels (pydantic_core, pyyaml, regex) are built for: 3.12 for
# the GPU machine; 3.11 only to rehearse the install here.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=bench_output/gpu_wheels
PYVER=3.12
TRANSFORMERS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --dest) DEST=$2; shift 2 ;;
        --python-version) PYVER=$2; shift 2 ;;
        --no-transformers) TRANSFORMERS=0; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu_wheels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

# what merge_engine imports that the bare machine lacks (docs/gpu.md: how this set was found)
ENGINE=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing_extensions==4.16.0 click==8.5.1 PyYAML==6.0.4 tqdm==4.70.1)
# the CUDA tests
TESTS=(pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 Pygments==2.21.0)
# fallback, installed only where the machine's transformers is missing or not 5.x
TRANSFORMERS_GROUP=(transformers==5.25.0 huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0
                    regex==2026.12.2 httpx2==2.17.0 httpcore2==2.17.0 h11==0.16.0 idna==3.21 truststore==0.10.5
                    anyio==4.16.0)

PKGS=("${ENGINE[@]}" "${TESTS[@]}")
[ "$TRANSFORMERS" = 1 ] && PKGS+=("${TRANSFORMERS_GROUP[@]}")

rm -rf "$DEST"
mkdir -p "$DEST"
PIP=(python3 -m pip)
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${PKGS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#PKGS[@]}" ]; then
    echo "gpu_wheels.sh: expected ${#PKGS[@]} wheels, got $count in $DEST" >&2
    exit 1
fi
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$count wheels, $((total / 1024)) KiB in $DEST (python $PYVER)"
