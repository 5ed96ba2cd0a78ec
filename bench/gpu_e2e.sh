#!/usr/bin/env bash
# The paper setting end to end through DVC, shortened, with the bench loop beside it in the same call.
#
#   bash bench/gpu_e2e.sh                    on the GPU machine, from the repository root
#   DEVICE=cpu SIZE=32 TRAIN=12 VALID=4 BENCH=0 bash bench/gpu_e2e.sh     the same steps on a CPU
#
# Settings (environment): DEVICE (cuda), SIZE (256), EPOCHS (3), TRAIN / VALID images per class
# (160 / 40), SEEDS ([0]), JOBS (4 trainings at once), SANITY_STEPS (3), KEEP (the study variants kept), WORK (/tmp/resnorm-e2e), OUT (results;
# $OUT of the device tool when set), WHEELS (.gpu-wheels), BENCH (1: run bench/gpu_paper_epoch.py).
#
# The GPU machine reaches no registry and its torch differs from the pin (../shared/notes/gpu-facts.md):
# dvc and grad-cam are installed from WHEELS (make them here with `bash bench/gpu_wheels.sh` and
# carry the folder), and the pipeline runs with PYTHONPATH pointing at the copied src/.
#
# Steps: 1 tools  2 a birds-like JPEG set  3 a fresh git + DVC copy of this pipeline  4 the README's
# paper-setting command (`resnorm.parallel -S ...`: params edited as `dvc exp run -S` does, the
# training stages JOBS at a time and recorded with `dvc commit`, then `dvc repro`), epochs cut short  5 every declared output
# exists  6 kill -9 a training, rerun it: it resumes  7 per-stage times, the train loop's images/s,
# the bench's images/s.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-256}
EPOCHS=${EPOCHS:-3}
TRAIN=${TRAIN:-160}
VALID=${VALID:-40}
SEEDS=${SEEDS:-[0]}
JOBS=${JOBS:-4}
SANITY_STEPS=${SANITY_STEPS:-3}
KEEP=${KEEP:-bn-bs32 gn-bs32 torch_bn-bs32 bn-bs8-es gn-bs8-es bn-bs128-es gn-bs128-es}
WORK=${WORK:-/tmp/resnorm-e2e}
OUT=${OUT:-$WORK/out}
WHEELS=${WHEELS:-$HERE/.gpu-wheels}
BENCH=${BENCH:-1}
PY=${PYTHON:-python}
case "$PY" in */*) export PATH="$(dirname "$PY"):$PATH" ;; esac      # stage commands call `python`
step() { echo; echo "== $* ($(date +%T))"; }

step "1. tools"
if ! command -v python >/dev/null; then           # stage commands in dvc.yaml call `python`
    mkdir -p /tmp/pyshim && ln -sf "$(command -v python3)" /tmp/pyshim/python && export PATH=/tmp/pyshim:$PATH
fi
pip_install() { "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$@" 2>/dev/null ||
                "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --break-system-packages "$@"; }
"$PY" -c "import dvc" 2>/dev/null || pip_install dvc==3.67.1
"$PY" -c "import pytorch_grad_cam" 2>/dev/null || pip_install --no-deps grad-cam==1.5.7 ttach==0.0.3
"$PY" -c "import torch, dvc; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '| dvc', dvc.__version__)"

step "2. data"
rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"
"$PY" "$HERE/bench/make_birds_like.py" "$WORK/birds" --train "$TRAIN" --valid "$VALID"

step "3. a fresh repository with this pipeline"
REPO=$WORK/repo
mkdir -p "$REPO"
cd "$REPO"
export PYTHONPATH=$REPO/src GIT_AUTHOR_NAME=e2e GIT_AUTHOR_EMAIL=e2e@local GIT_COMMITTER_NAME=e2e \
       GIT_COMMITTER_EMAIL=e2e@local DVC_NO_ANALYTICS=1
if command -v git >/dev/null; then git init -q; "$PY" -m dvc init -q; else "$PY" -m dvc init -q --no-scm; fi
"$PY" "$HERE/bench/gpu_speed.py" --copy-pipeline "$REPO"     # the stages' code and every input no stage makes
"$PY" - "$KEEP" <<'EOF'
import sys, yaml
keep = sys.argv[1].split()
p = yaml.safe_load(open("params.yaml"))
p["study"]["variants"] = {k: v for k, v in p["study"]["variants"].items() if k in keep}
open("params.yaml", "w").write(yaml.safe_dump(p, sort_keys=False))
print("study variants kept:", ", ".join(p["study"]["variants"]))
EOF
if command -v git >/dev/null; then git add -A && git commit -qm "baseline: $KEEP"; fi

step "4. the README's paper-setting command, epochs cut to $EPOCHS"
mapfile -t S < <("$PY" - "$HERE/README.md" <<'EOF'
import shlex, sys
text = open(sys.argv[1]).read()
section = text[text.index("### The paper setting"):]
block = section[section.index("```bash"):].split("```")[1].replace("\\\n", " ")
command = next(line for line in block.splitlines() if " -S " in line)
args = shlex.split(command)
for a in (args[i + 1] for i, x in enumerate(args) if x == "-S"):
    if not a.startswith("data.root="):
        print(a)
EOF
)
S+=("data.root=$WORK/birds" "data.image_size=$SIZE" "train.epochs=$EPOCHS" "train.device=$DEVICE" "study.seeds=$SEEDS"
   "sanity.steps=$SANITY_STEPS")
if [ "$DEVICE" = cpu ]; then
    S+=("train.precision=fp32" "train.compile=false" "train.workers=0" "train.threads=1")
fi
ARGS=()
for s in "${S[@]}"; do ARGS+=(-S "$s"); done
echo "python -m resnorm.parallel -j $JOBS ${ARGS[*]}"
start=$(date +%s)
if ! "$PY" -m resnorm.parallel -j "$JOBS" "${ARGS[@]}" > "$OUT/parallel.log" 2>&1; then
    tail -30 "$OUT/parallel.log"; echo "resnorm.parallel failed: see $OUT/parallel.log"; exit 1
fi
grep -E "training stages|^(start|done|failed) |runs trained|Running stage|error" "$OUT/parallel.log" || true
echo "stage wall times:"
"$PY" -m resnorm.times "$start" | tee "$OUT/stage_times.txt"
"$PY" -m dvc status | tail -1

step "5. every declared output exists"
"$PY" - <<'EOF'
import pathlib, yaml
stages = yaml.safe_load(open("dvc.lock"))["stages"]
missing = [(n, o["path"]) for n, s in stages.items() for o in s.get("outs", []) if not pathlib.Path(o["path"]).exists()]
print(f"{len(stages)} stages in dvc.lock, {sum(len(s.get('outs', [])) for s in stages.values())} outputs, "
      f"{len(missing)} missing {missing if missing else ''}")
assert not missing
EOF

step "6. kill -9 a training, then rerun it"
rm -rf models/experiment               # `dvc repro` (not `exp run`, which restores outputs first) retrains it
# at least 10 epochs, so that the kill lands mid-run even where an epoch takes 0.2 s (a CPU at 16 px)
"$PY" - "$(( EPOCHS > 10 ? EPOCHS : 10 ))" <<'EOF'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
p["train"]["epochs"] = int(sys.argv[1])
open("params.yaml", "w").write(yaml.safe_dump(p, sort_keys=False))
EOF
"$PY" -m dvc repro train > "$OUT/killed.log" 2>&1 &
for _ in $(seq 3000); do            # the epoch line is printed after that epoch's checkpoint is saved
    grep -q "experiment epoch 1/" "$OUT/killed.log" 2>/dev/null && break
    sleep 0.2
done
for pid in $(pgrep -f "resnorm.train" || true); do          # only this repository's training
    [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$REPO" ] && kill -9 "$pid" || true
done
wait || true
tail -3 "$OUT/killed.log"
"$PY" -m dvc repro train > "$OUT/resumed.log" 2>&1 || { tail -20 "$OUT/resumed.log"; exit 1; }
grep -E "resuming|starting over|finished" "$OUT/resumed.log" || true
grep -q "resuming after epoch" "$OUT/resumed.log" && echo "resumed after the kill" || { echo "did not resume"; exit 1; }

step "7. the train loop's images/s (epochs 2 on, from logs/timing/) and the bench's"
"$PY" - <<'EOF' | tee "$OUT/pipeline_images_per_second.txt"
import csv, glob, statistics
for f in sorted(glob.glob("logs/timing/*.csv")):
    rows = list(csv.DictReader(open(f)))
    rates = [float(r["images_per_second"]) for r in rows[1:]] or [float(r["images_per_second"]) for r in rows]
    if rates:
        print(f"{f.split('/')[-1][:-4]:<22} {statistics.median(rates):8.0f} images/s (median of {len(rates)} epoch(s))")
EOF
if [ "$BENCH" = 1 ] && [ "$DEVICE" = cuda ]; then
    "$PY" "$HERE/bench/gpu_paper_epoch.py" --only bn,gn,torch_bn --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -20
fi
cp plots/report.md "$OUT/report.md" 2>/dev/null || true
echo; echo "done: results in $OUT"
