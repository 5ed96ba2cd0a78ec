"""Benchmark: can the data path feed training? Batches/s of reading + augmenting + collating
prepared images, against the train step's consumption, at the default settings.

  python bench/bench_data.py            (needs data/prepared from `dvc repro prepare`)

Prints images/s for the data path alone (0 and 2 workers), for one train step of the
default model without data, and their ratio, plus the resident memory growth.
"""
from __future__ import annotations

import resource
import statistics
import time

import torch

from resnorm.data import EpochBatches, batches, load_split, load_train_stats
from resnorm.params import load_params
from resnorm.train import make_model, make_optimizer


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = load_params()
    v = p.experiment()
    t = v.train
    torch.set_num_threads(t.threads)
    split = load_split("train")
    mean, std = load_train_stats()
    rss0 = rss_mb()
    for workers in (0, 2):
        n, t0 = 0, time.perf_counter()
        for epoch in range(5):
            ds = EpochBatches.training(split, v.batch_size, mean, std, t, seed=0, epoch=epoch)
            for batch in batches(ds, workers):
                x, y = ds.to(batch, "cpu", t.channels_last)
                n += len(y)
        data_rate = n / (time.perf_counter() - t0)
        print(f"data path, {workers} workers: {data_rate:8.0f} images/s "
              f"({len(split)} images x 5 epochs, batch {v.batch_size}, augment {t.augment})")
        if workers == 0:
            data_rate0 = data_rate
    print(f"peak RSS growth while reading: {rss_mb() - rss0:.1f} MB (arrays are memory-mapped: "
          f"{split.x.nbytes / 2**20:.1f} MB on disk)")
    model = make_model(v.model, v.norm, int(split.y.max()) + 1)
    opt = make_optimizer(model, t)
    x = torch.randn(v.batch_size, 3, p.data.image_size, p.data.image_size)
    y = torch.randint(0, int(split.y.max()) + 1, (v.batch_size,))
    times = []
    for i in range(25):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    step_rate = v.batch_size / statistics.median(times)
    print(f"train step ({v.norm}, batch {v.batch_size}, {p.data.image_size}px): {step_rate:8.0f} images/s")
    print(f"data path / train step: {data_rate0 / step_rate:.1f}x (goal: >= 5x)")


if __name__ == "__main__":
    main()
