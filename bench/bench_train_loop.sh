#!/usr/bin/env bash
# Benchmark through the real train loop: `python -m resnorm.train` with this project's BN and with
# nn.BatchNorm2d, alternated round by round in one run, on torchvision's ResNet-18 at 64 px (the
# embedded data set, batch 32, 8 epochs, channels_last, this machine's threads).
#
#   bash bench/bench_train_loop.sh [ROUNDS] [WORKDIR]      (defaults: 3 rounds, a fresh temp folder)
#
# It copies params.yaml and data/raw/ifct into WORKDIR, sets data.image_size: 64, model.arch:
# resnet18, train.epochs: 8, prepares the data there, then runs the train stage's own command once
# per norm per round. Prints the median train images/s of each norm over epochs 2-8 (epoch 1
# compiles and warms up) and ours / built-in throughput, paired by round, with its 95% interval
# (resnorm.stats.mean_interval on the logs of the per-round ratios). Needs the activated .venv and
# a `dvc repro` that has fetched the data (data/raw/ifct).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ROUNDS="${1:-3}"
WORK="${2:-$(mktemp -d)}"
PY="${PYTHON:-python}"
[ -d "$ROOT/data/raw/ifct" ] || { echo "bench_train_loop: $ROOT/data/raw/ifct is missing: run 'make repro' first" >&2; exit 2; }
mkdir -p "$WORK/data/raw"
cp "$ROOT/params.yaml" "$WORK/"
[ -d "$WORK/data/raw/ifct" ] || cp -r "$ROOT/data/raw/ifct" "$WORK/data/raw/"
cd "$WORK"
set_params() {  # key=value ... into params.yaml (dotted keys)
    "$PY" - "$@" <<'PY'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
for item in sys.argv[1:]:
    key, value = item.split("=", 1)
    *path, last = key.split(".")
    d = p
    for k in path:
        d = d[k]
    d[last] = yaml.safe_load(value)
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
}
set_params data.image_size=64 model.arch=resnet18 train.epochs=8
echo "bench_train_loop: preparing 64 px data in $WORK" >&2
"$PY" -m resnorm.prepare > prepare.log 2>&1
for r in $(seq 1 "$ROUNDS"); do
    for norm in bn torch_bn; do
        set_params norm="$norm"
        rm -rf models/experiment logs/timing
        echo "bench_train_loop: round $r, $norm" >&2
        "$PY" -m resnorm.train > "train_${norm}_${r}.log" 2>&1
        cp logs/timing/experiment.csv "timing_${norm}_${r}.csv"
    done
done
"$PY" - "$ROUNDS" <<'PY'
import csv, math, statistics, sys
from resnorm.stats import mean_interval
rounds = int(sys.argv[1])
rates, logs = {"bn": [], "torch_bn": []}, []
for r in range(1, rounds + 1):
    med = {}
    for norm in rates:
        rows = [row for row in csv.DictReader(open(f"timing_{norm}_{r}.csv")) if int(row["epoch"]) >= 2]
        epoch_rates = [float(row["images_per_second"]) for row in rows]
        rates[norm] += epoch_rates
        med[norm] = statistics.median(epoch_rates)
    logs.append(math.log(med["bn"] / med["torch_bn"]))
for norm, v in rates.items():
    print(f"{norm:9} median {statistics.median(v):7.1f} train images/s (epochs 2-8, {rounds} rounds; {min(v):.0f}-{max(v):.0f})")
m, lo, hi = mean_interval(logs)
interval = (f"95% interval {math.exp(lo):.2f}-{math.exp(hi):.2f}" if len(logs) > 1
            else "one round gives no interval: run 3 or more")
print(f"ours / built-in throughput {math.exp(m):.2f}x [{interval}] over {rounds} rounds")
PY
