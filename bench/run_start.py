"""Seconds from `python -m resnorm.train` to its first training batch: what every run of a study
pays before its first step (imports, the splits opened, the model built, the train split's mean
and std, the checkpoint looked at). On a GPU the data copy and the compile come on top.

  python bench/run_start.py                        # the experiment's run, 3 times
  python bench/run_start.py --repeat 5 -- --variant gn-bs32 --seed 0

Run it in a scratch copy of the repository whose `data/prepared` is made (the README's figures:
the birds set's size, 256 px): a run that starts from scratch removes its old `best.pt`. Each try
is a new process that runs `resnorm.train` as `python -m` does and exits at the first batch
(`resnorm.data.batches`, patched in the child only). `--src DIR` runs another checkout's code on
the same data, to compare before and after a change. Beside it, the time of one
`channel_stats` pass over train_x: what each run spent on the statistics before `prepare`
wrote them into `arrays.json`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REACHED = 42          # the child's exit status at its first batch

CHILD = f"""
import os, runpy, sys
import resnorm.data
def first_batch(*args, **kwargs):
    os._exit({REACHED})
resnorm.data.batches = first_batch
sys.argv = ["resnorm.train", *sys.argv[1:]]
runpy.run_module("resnorm.train", run_name="__main__", alter_sys=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                    help="the resnorm code to run (default: this checkout's)")
    ap.add_argument("train_args", nargs="*", help="after --: arguments of resnorm.train")
    args = ap.parse_args()
    if not Path("data/prepared/train_x.npy").exists():
        sys.exit("data/prepared/train_x.npy not found: run this in a repository after `dvc repro prepare`")
    env = {**os.environ, "PYTHONPATH": str(args.src.resolve())}
    took = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", CHILD, *args.train_args], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        took.append(time.perf_counter() - start)
        if r.returncode != REACHED:
            sys.exit(f"resnorm.train ended (exit {r.returncode}) before its first batch: "
                     f"{(r.stderr.strip().splitlines() or [''])[-1]}")
    print(f"python -m resnorm.train {' '.join(args.train_args)} to its first batch ({args.src}): "
          f"median {statistics.median(took):.2f} s, {min(took):.2f}-{max(took):.2f} s over {len(took)} starts")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))      # this checkout's
    import numpy as np
    from resnorm.prepare import channel_stats
    x = np.load("data/prepared/train_x.npy", mmap_mode="r")
    start = time.perf_counter()
    channel_stats(x)
    print(f"one channel_stats pass over train_x ({len(x):,} images at {x.shape[1]} px): "
          f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
