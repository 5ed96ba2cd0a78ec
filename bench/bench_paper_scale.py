"""Benchmark: CPU-side work that only shows at the paper's size (256 px), on generated data.

  python bench/bench_paper_scale.py                   # both, 4,096 images for the statistics
  python bench/bench_paper_scale.py --images 1024 --only stats

stats:     `resnorm.prepare.channel_stats` (exact integer sums, which prepare runs once on the train split)
           against the plain float64 formula it replaced, on a memory-mapped array like a
           prepared split, scaled to the birds train split (24,706 images).
visualize: `resnorm.visualize.activation_stats` over 256 images (`visualize.stat_images`) of an
           untrained bn model, 32 images a pass (the stage) against one pass over all of them:
           seconds and peak resident memory, each in a process of its own.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIRDS_TRAIN = 24_706
SIZE = 256


def float64_stats(x: np.ndarray, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """channel_stats as it was before exact integer sums: float64 sums of x / 255 and its square."""
    total, sq, count = np.zeros(3), np.zeros(3), 0
    for i in range(0, len(x), chunk):
        a = np.asarray(x[i:i + chunk], dtype=np.float64) / 255.0
        total += a.sum(axis=(0, 1, 2))
        sq += (a * a).sum(axis=(0, 1, 2))
        count += a.shape[0] * a.shape[1] * a.shape[2]
    mean = total / max(count, 1)
    return mean.tolist(), np.sqrt(np.maximum(sq / max(count, 1) - mean ** 2, 1e-12)).tolist()


def bench_stats(images: int) -> None:
    from resnorm.prepare import channel_stats
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_x.npy"
        x = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(images, SIZE, SIZE, 3))
        rng = np.random.default_rng(0)
        for i in range(0, images, 512):
            x[i:i + 512] = rng.integers(0, 256, size=x[i:i + 512].shape, dtype=np.uint8)
        x.flush()
        del x
        mapped = np.load(path, mmap_mode="r")
        for name, fn in (("exact integer sums", channel_stats), ("float64 (before)", float64_stats)):
            t0 = time.perf_counter()
            mean, std = fn(mapped)
            dt = time.perf_counter() - t0
            print(f"stats {name:<20} {dt:6.2f} s for {images:,} images at {SIZE} px; "
                  f"{dt * BIRDS_TRAIN / images:5.0f} s scaled to {BIRDS_TRAIN:,}; mean {mean[0]:.6f}", flush=True)


CHILD = """
import json, sys, time, torch
from resnorm.model import model_from_config
from resnorm.visualize import activation_stats
torch.set_num_threads(2)
torch.manual_seed(0)
config = {"arch": "resnet6n2", "num_classes": 25, "norm": "bn", "gn_groups": 4, "dropout": 0.0, "n": 2,
          "shortcut": "A", "block": "basic", "image_size": %d}
model = model_from_config(config).eval()
x = torch.randn(256, 3, %d, %d)
t0 = time.perf_counter()
activation_stats(model, x, chunk=int(sys.argv[1]))
seconds = time.perf_counter() - t0
# VmHWM: this process image's peak resident memory (getrusage's maxrss would also count the parent's
# peak before the fork, which Linux carries across exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_gib": hwm / 2**20}))
""" % (SIZE, SIZE, SIZE)


def bench_visualize() -> None:
    for label, chunk in (("32 a pass (the stage)", 32), ("all 256 in one pass", 256)):
        r = subprocess.run([sys.executable, "-c", CHILD, str(chunk)], capture_output=True, text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"visualize {label:<22} {m['seconds']:6.1f} s, peak resident memory {m['peak_gib']:.2f} GiB "
              f"(256 images at {SIZE} px)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4096, help="images for the statistics (default 4096)")
    ap.add_argument("--only", choices=("stats", "visualize"))
    args = ap.parse_args()
    if args.images < 1:
        ap.error(f"--images = {args.images}: at least 1")
    if args.only in (None, "stats"):
        bench_stats(args.images)
    if args.only in (None, "visualize"):
        bench_visualize()


if __name__ == "__main__":
    main()
