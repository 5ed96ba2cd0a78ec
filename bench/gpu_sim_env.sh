#!/usr/bin/env bash
# The GPU machine's software, here, for the CPU rehearsal of a GPU session.
#
# The GPU machine runs Python 3.12 with torch 2.11.0 and torchvision 0.26.0, and lacks dvc and
# grad-cam (../shared/notes/gpu-facts.md); this project pins torch 2.14.1 on Python 3.11. A
# rehearsal in .venv cannot catch code that needs a newer torch than 2.11, or a wheel in
# .gpu-wheels/ that will not install offline on 3.12. This builds a virtual environment with what
# that machine has (torch's CUDA build: it imports without a GPU), and no dvc or grad-cam, so the
# rehearsal's first step installs them from .gpu-wheels/ with --no-index, as it will there:
#
#   bash bench/gpu_wheels.sh && bash bench/gpu_sim_env.sh          # about 1 minute, 5.3 GB in /tmp/gpu-sim
#   PATH=/tmp/gpu-sim/bin:$PATH STEPS="single32 bench32 concurrent e2e batches goal2" \
#     DEVICE=cpu SIZE=16 IMAGES=128 E2E_TRAIN=12 E2E_VALID=4 bash bench/gpu_check.sh
#
# Expected failures there, and only there: the bench loop needs CUDA; and torch 2.11's inductor
# cannot compile this model for a CPU (its C++ code does not build: "'decltype' evaluates to
# 'float'"), so the steps that compile on a CPU (bn at batch 8 with CUDA graphs, goal 2's graphs8,
# profile and autotune) fail. On CUDA inductor writes Triton kernels instead, and this fault is
# torch's, gone by 2.14.
#   bash bench/gpu_sim_env.sh [DIR]      (PYTHON312=... names the interpreter when it is not found)
set -euo pipefail
DIR=${1:-/tmp/gpu-sim}
find_python312() {
    local p
    for p in "${PYTHON312:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
        [ -n "$p" ] && "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$p"; return; }
    done
    echo "no Python 3.12 found: set PYTHON312=/path/to/python3.12" >&2
    exit 2
}
PY=$(find_python312)
"$PY" -m venv "$DIR"
"$DIR/bin/pip" install --quiet --disable-pip-version-check torch==2.11.0 torchvision==0.26.0 \
    numpy pyyaml scikit-learn matplotlib rich pillow opencv-python-headless
"$DIR/bin/python" -c "import sys, torch, torchvision; print(f'{sys.argv[1]}: Python {sys.version.split()[0]}, torch',
    torch.__version__, 'torchvision', torchvision.__version__)" "$DIR"
