#!/usr/bin/env bash
# Wheels for the GPU machine, which reaches no package registry and lacks dvc and grad-cam
# (../shared/notes/gpu-facts.md: Python 3.12, x86_64). Run here; carry the folder with the
# device tool (carry: [".gpu-wheels"], about 30 MB), then `bash bench/gpu_e2e.sh` there.
#   bash bench/gpu_wheels.sh [DIR]        (default .gpu-wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu-wheels}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
# pure-Python packages published only as source: build them once into wheels
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$DIR" \
    antlr4-python3-runtime==4.9.3 grad-cam==1.5.7 ttach==0.0.3
# dvc and everything it needs, as binary wheels for CPython 3.12 on manylinux x86_64
"$PY" -m pip download --quiet --disable-pip-version-check -d "$DIR" --find-links "$DIR" \
    --python-version 3.12 --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    dvc==3.67.1
echo "$(ls "$DIR" | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
