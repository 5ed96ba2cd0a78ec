#!/usr/bin/env bash
# One GPU session for the paper setting, most important figures first, within BUDGET seconds:
#   1 dvc + grad-cam from the carried wheels        2 resnorm.train alone: bn, gn, torch_bn at batch 32
#   3 the bench loop on the same configurations     4 resnorm.parallel -j 4 and -j 8: aggregate images/s
#   5 bench/gpu_e2e.sh: the README's command end to end    6 batch 8 (also with CUDA graphs) and 128
#
#   bash bench/gpu_wheels.sh              here, once: .gpu-wheels/ (the GPU machine reaches no registry)
#   bash bench/gpu_check.sh               there (device tool: carry [".gpu-wheels"]), from the repo root
#
# Every step writes into $OUT as it goes (speed.json, logs, report.md), so a call cut short keeps
# what it measured; a step that would start past BUDGET is skipped and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD
OUT=${OUT:-/tmp/gpu-check}
BUDGET=${BUDGET:-480}
DEVICE=${DEVICE:-cuda}           # DEVICE=cpu SIZE=32 IMAGES=256 E2E_TRAIN=12 E2E_VALID=4: the same steps on a CPU
SIZE=${SIZE:-256}
IMAGES=${IMAGES:-4096}
T0=$(date +%s)
mkdir -p "$OUT"
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
step() { echo; echo "== $* ($(( $(date +%s) - T0 )) s)"; }
if ! command -v python >/dev/null; then           # stage commands in dvc.yaml call `python`
    mkdir -p /tmp/pyshim && ln -sf "$(command -v python3)" /tmp/pyshim/python && export PATH=/tmp/pyshim:$PATH
fi
export PYTHON=${PYTHON:-$(command -v python)} DVC_NO_ANALYTICS=1

step "1. tools"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
pip_install() { "$PYTHON" -m pip install --quiet --no-index --find-links "$HERE/.gpu-wheels" "$@" 2>/dev/null ||
                "$PYTHON" -m pip install --quiet --no-index --find-links "$HERE/.gpu-wheels" --break-system-packages "$@"; }
"$PYTHON" -c "import dvc" 2>/dev/null || pip_install dvc==3.67.1
"$PYTHON" -c "import pytorch_grad_cam" 2>/dev/null || pip_install --no-deps grad-cam==1.5.7 ttach==0.0.3
"$PYTHON" -c "import torch, dvc; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(), '| dvc', dvc.__version__)"
"$PYTHON" -c "import os; print(os.cpu_count(), 'CPUs')"

SPEED=("$PYTHON" bench/gpu_speed.py --out "$OUT" --device "$DEVICE" --size "$SIZE" --images "$IMAGES")
step "2. resnorm.train alone, batch 32"
"${SPEED[@]}" --phase single --configs bn:32,gn:32,torch_bn:32 --budget "$(left)" 2>&1 | tee -a "$OUT/speed.log"

step "3. the bench loop, batch 32"
[ "$(left)" -gt 60 ] && "${SPEED[@]}" --phase bench --configs bn:32,gn:32,torch_bn:32 --bench-seconds 5 2>&1 |
    grep -v "^\s*$" | tail -8 | tee -a "$OUT/speed.log" || echo "skipped: past the time budget"

step "4. several runs at once on the one GPU"
[ "$(left)" -gt 60 ] && "${SPEED[@]}" --phase concurrent --jobs 4,8 --epochs 2 --budget "$(( $(left) - 40 ))" 2>&1 |
    tee -a "$OUT/speed.log" || echo "skipped: past the time budget"

step "5. end to end through DVC (bench/gpu_e2e.sh)"
if [ "$(left)" -gt 100 ]; then
    OUT=$OUT/e2e SIZE=$SIZE TRAIN=${E2E_TRAIN:-40} VALID=${E2E_VALID:-10} EPOCHS=2 DEVICE=$DEVICE JOBS=4 BENCH=0 \
        KEEP="bn-bs32 gn-bs32" bash bench/gpu_e2e.sh 2>&1 | tee "$OUT/e2e.log" | grep -v "^  .* s$" | tail -50
    grep "^  " "$OUT/e2e/stage_times.txt" 2>/dev/null
else
    echo "skipped: past the time budget"
fi

step "6. batch 8 (default compile, then CUDA graphs) and 128"
[ "$(left)" -gt 50 ] && "${SPEED[@]}" --phase single --configs bn:8:reduce-overhead,bn:128,bn:8 \
    --budget "$(( $(left) - 40 ))" 2>&1 | tee -a "$OUT/speed.log" || echo "skipped: past the time budget"
[ "$(left)" -gt 45 ] && "${SPEED[@]}" --phase bench --configs bn:8,bn:128 --bench-seconds 4 2>&1 |
    grep -v "^\s*$" | tail -4 | tee -a "$OUT/speed.log" || echo "skipped: past the time budget"

step "done"
cat "$OUT/speed.json" 2>/dev/null
