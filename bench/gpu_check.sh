#!/usr/bin/env bash
# One GPU session for the paper setting, most important figures first, within BUDGET seconds:
#   tools: dvc + grad-cam from the carried wheels     single32: resnorm.train alone, bn, gn, torch_bn at batch 32
#   bench32: the bench loop on the same configurations   concurrent: resnorm.parallel -j 4 and -j 8, aggregate images/s
#   e2e: bench/gpu_e2e.sh, the README's command end to end
#   batches: batch 8 (bn also with CUDA graphs) and 128, resnorm.train and the bench loop
#   goal2: ways to a shorter study (not in the default list): 4 runs at once at batch 8 under CUDA
#          graphs, with and without MPS, and at batch 32 under MPS; where a step's device time goes
#          (bench/gpu_profile.py); inductor's max-autotune. GOAL2="..." picks and orders them (below)
#   Last, always: the paper study's training time projected from every figure in $OUT/speed.json
#
#   bash bench/gpu_wheels.sh              here, once: .gpu-wheels/ (the GPU machine reaches no registry)
#   bash bench/gpu_check.sh               there (device tool: carry [".gpu-wheels"]), from the repo root
#   STEPS="e2e batches" bash bench/gpu_check.sh      only some steps, in that order (tools always first):
#                                         single32 bench32 concurrent e2e batches (the default: all of them), goal2
#
# Every step writes into $OUT as it goes (speed.json, logs, report.md), so a call cut short keeps
# what it measured; a step that would start past BUDGET is skipped, and one still running when its share
# runs out is stopped with every process it started (timeout signals its process group); each says so.
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

# every name checked before any work: a misspelt probe must not cost a device session its first minutes
STEP_NAMES=" single32 bench32 concurrent e2e batches goal2 " PROBE_NAMES=" graphs8 mps8 graphs32 mps32 profile fp32 cudnnall autotune "
for s in ${STEPS:-}; do
    [[ $STEP_NAMES == *" $s "* ]] || { echo "unknown step '$s' (STEPS:$STEP_NAMES)" >&2; exit 2; }; done
for p in ${GOAL2:-}; do
    [[ $PROBE_NAMES == *" $p "* ]] || { echo "unknown goal-2 probe '$p' (GOAL2:$PROBE_NAMES)" >&2; exit 2; }; done

step "tools"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
pip_install() { "$PYTHON" -m pip install --quiet --no-index --find-links "$HERE/.gpu-wheels" "$@" 2>/dev/null ||
                "$PYTHON" -m pip install --quiet --no-index --find-links "$HERE/.gpu-wheels" --break-system-packages "$@"; }
"$PYTHON" -c "import dvc" 2>/dev/null || pip_install dvc==3.67.1
"$PYTHON" -c "import pytorch_grad_cam" 2>/dev/null || pip_install --no-deps grad-cam==1.5.7 ttach==0.0.3
"$PYTHON" -c "import torch, dvc; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(), '| dvc', dvc.__version__)"
"$PYTHON" -c "import os; print(os.cpu_count(), 'CPUs')"

SPEED=("$PYTHON" bench/gpu_speed.py --out "$OUT" --device "$DEVICE" --size "$SIZE" --images "$IMAGES")
# budgeted NEED LOG COMMAND...: runs COMMAND if more than NEED seconds of the budget are left, under a
# timeout that keeps 10 s for the rest (a run that hangs, say on an MPS server that never answers or a
# DataLoader worker that never returns, must not eat the call; timeout signals its whole process group),
# its output shown and added to $OUT/LOG; else says it is skipped. Every step below goes through it.
budgeted() {
    local need=$1 log=$2; shift 2
    if [ "$(left)" -le "$need" ]; then echo "skipped: past the time budget"; return; fi
    local limit=$(( $(left) - 10 ))
    timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "^USDT\|^STAGE:" | tee -a "$OUT/$log"
    [ "${PIPESTATUS[0]}" = 124 ] && echo "stopped: the step's ${limit} s of budget ran out (its output so far is above)" |
        tee -a "$OUT/$log"
    return 0
}
single32() {
    step "resnorm.train alone, batch 32"
    budgeted 30 speed.log "${SPEED[@]}" --phase single --configs bn:32,gn:32,torch_bn:32 --budget "$(left)"
}
bench32() {
    step "the bench loop, batch 32"
    budgeted 60 speed.log "${SPEED[@]}" --phase bench --configs bn:32,gn:32,torch_bn:32 --bench-seconds 5 |
        grep -v "^\s*$" | tail -8
}
concurrent() {
    step "several runs at once on the one GPU"
    budgeted 60 speed.log "${SPEED[@]}" --phase concurrent --jobs 4,8 --epochs 2 --budget "$(( $(left) - 40 ))"
}
e2e() {
    step "end to end through DVC (bench/gpu_e2e.sh)"
    budgeted 100 e2e.log env OUT="$OUT/e2e" SIZE="$SIZE" TRAIN="${E2E_TRAIN:-40}" VALID="${E2E_VALID:-10}" EPOCHS=2 \
        DEVICE="$DEVICE" JOBS=4 BENCH=0 KEEP="bn-bs32 gn-bs32" bash bench/gpu_e2e.sh | grep -v "^  .* s$" | tail -50
    grep "^  " "$OUT/e2e/stage_times.txt" 2>/dev/null
}
batches() {
    step "batch 8 and 128: resnorm.train (bn at 8 also with CUDA graphs), then the bench loop"
    local configs=${BATCH_CONFIGS:-bn:8,bn:8:reduce-overhead,bn:128,gn:8,gn:128,torch_bn:8,torch_bn:128}
    budgeted 50 speed.log "${SPEED[@]}" --phase single --configs "$configs" --budget "$(( $(left) - 100 ))"
    # the bench loop on the same norms and batch sizes (the pipeline's compile modes dropped)
    local bench; bench=$(tr ',' '\n' <<< "$configs" | cut -d: -f1,2 | sort -u | paste -sd, -)
    budgeted 45 speed.log "${SPEED[@]}" --phase bench --configs "$bench" --bench-seconds 4 | grep -v "^\s*$" | tail -8
}
# Runs "$@" under an MPS control daemon of this call's own (pipe folder in /tmp, log under $OUT), then
# quits it. Without MPS a GPU time-slices between processes, so kernels of different processes never
# run at the same time (NVIDIA's MPS guide): 4 runs at once can only fill each other's idle gaps.
# MPS lets their kernels share the SMs. It is a user process: no setting of the device changes.
with_mps() {
    if ! command -v nvidia-cuda-mps-control >/dev/null; then echo "skipped: no nvidia-cuda-mps-control here"; return; fi
    local pipe=/tmp/resnorm-mps-$$ log=$OUT/mps-log
    mkdir -p "$pipe" "$log"
    if ! CUDA_MPS_PIPE_DIRECTORY=$pipe CUDA_MPS_LOG_DIRECTORY=$log nvidia-cuda-mps-control -d; then
        echo "skipped: the MPS daemon did not start (see $log)"; return; fi
    CUDA_MPS_PIPE_DIRECTORY=$pipe CUDA_MPS_LOG_DIRECTORY=$log "$@"
    echo quit | CUDA_MPS_PIPE_DIRECTORY=$pipe nvidia-cuda-mps-control
}
together() {      # together CFG [COMPILE]: 4 runs of CFG (norm:batch) at once through resnorm.parallel
    budgeted 90 speed.log "${SPEED[@]}" --phase concurrent --jobs 4 --epochs 2 --concurrent-config "$1" \
        ${2:+--concurrent-compile "$2"} --budget "$(( $(left) - 40 ))"
}
# goal 2's probes, in GOAL2's order (default: graphs8 mps8 mps32 profile fp32 cudnnall autotune):
#   graphs8  4 runs of bn at batch 8 at once under CUDA graphs (one run alone there leaves the GPU idlest)
#   mps8     the same under MPS            mps32  bn at batch 32, 4 at once, inductor's default mode, under MPS
#   graphs32 bn at batch 32, 4 at once under CUDA graphs
#   profile  bench/gpu_profile.py: where a step's device time goes (bn and torch_bn at batch 32)
#   fp32     resnorm.train alone in fp32 (bn, batch 32): cuDNN's TF32 convolutions against bf16's
#            (bf16 weight-gradient kernels at few channels can be the slower ones)
#   cudnnall resnorm.train alone (bn, batch 32) with cuDNN's autotuner trying every algorithm: PyTorch
#            tries its heuristics' first 10 (torch.backends.cudnn.benchmark_limit), and 16-channel
#            convolutions are an unusual shape
#   autotune inductor's max-autotune, resnorm.train alone (bn, batch 32)
goal2() {
    for probe in ${GOAL2:-graphs8 mps8 mps32 profile fp32 cudnnall autotune}; do
        case $probe in
            graphs8) step "goal 2: 4 runs at once, bn at batch 8, CUDA graphs (resnorm.parallel -j 4, reduce-overhead)"
                     together bn:8 reduce-overhead ;;
            mps8) step "goal 2: 4 runs at once, bn at batch 8, CUDA graphs, under MPS"; with_mps together bn:8 reduce-overhead ;;
            graphs32) step "goal 2: 4 runs at once, bn at batch 32, CUDA graphs"; together bn:32 reduce-overhead ;;
            mps32) step "goal 2: 4 runs at once, bn at batch 32, inductor's default mode, under MPS"; with_mps together bn:32 ;;
            profile) step "goal 2: where a step's time goes (bench/gpu_profile.py, bn and torch_bn at batch 32)"
                budgeted 60 profile.log "$PYTHON" bench/gpu_profile.py --norms bn,torch_bn --device "$DEVICE" \
                    --size "$SIZE" --out "$OUT" ;;
            fp32) step "goal 2: fp32 (TF32 convolutions), resnorm.train alone (bn, batch 32)"
                budgeted 90 speed.log "${SPEED[@]}" --phase single --configs bn:32 --precision fp32 ;;
            cudnnall) step "goal 2: cuDNN's autotuner over every algorithm (benchmark_limit 0; PyTorch tries 10), resnorm.train alone (bn, batch 32)"
                budgeted 90 speed.log "${SPEED[@]}" --phase single --configs bn:32 --cudnn-benchmark-limit 0 ;;
            autotune) step "goal 2: inductor's max-autotune, resnorm.train alone (bn, batch 32)"
                budgeted 120 speed.log "${SPEED[@]}" --phase single --configs bn:32:max-autotune ;;
        esac
    done
}
for s in ${STEPS:-single32 bench32 concurrent e2e batches}; do "$s"; done

step "the paper study's training time, projected from what this call (and earlier ones into \$OUT) measured"
"$PYTHON" bench/gpu_speed.py --phase project --out "$OUT" 2>&1 | tee -a "$OUT/speed.log"
step "done"
cat "$OUT/speed.json" 2>/dev/null || echo "no $OUT/speed.json: nothing was measured"
