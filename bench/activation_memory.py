"""Estimate: how much GPU memory one paper-setting run needs, so that `-j N` runs at once fit.

  python bench/activation_memory.py [--size 256] [--batches 8,32,128] [--norms bn,gn,torch_bn] [--jobs 4,8]

A run holds two things that grow with the setting:
1. its data, when `train.data_on_device` puts the uint8 train and val splits on the GPU
   (each run its own copy: the paper epoch's 24,706 + 7,500 images at 256 px are 6.3 GB);
2. the activations autograd saves for the backward pass, which grow with the batch.

This script measures (2) on the CPU: one forward pass of the 6n+2 net under bf16 autocast, with
`torch.autograd.graph.saved_tensors_hooks` adding up the distinct storages saved for backward.
It is an estimate of a GPU run, not a measurement of one: torch.compile fuses and may save
other tensors, and cuDNN's workspaces, the caching allocator's slack and the CUDA context
(about 0.5 GB) come on top. A run's real peak is in its timing log (`gpu_peak_gib` in
logs/timing/<run>.csv, what its allocator held), and `bench/gpu_speed.py` reports it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from resnorm.model import build_model  # noqa: E402
from gpu_speed import paper_epoch  # noqa: E402


def saved_bytes(norm: str, batch: int, size: int, n: int = 2, classes: int = 25) -> int:
    """Bytes of the distinct storages one training forward pass saves for backward (bf16 autocast)."""
    model = build_model("resnet6n2", classes, norm, n=n).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    return sum(storages.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", default="8,32,128")
    ap.add_argument("--norms", default="bn,gn,torch_bn")
    ap.add_argument("--jobs", default="4,8")
    args = ap.parse_args()
    train, val = paper_epoch()
    data = (train + val) * args.size * args.size * 3
    jobs = [int(j) for j in args.jobs.split(",")]
    print(f"data on the device, per run: ({train:,} + {val:,}) x {args.size}x{args.size}x3 bytes = {data / 2**30:.1f} GiB")
    print(f"{'norm':<9} {'batch':>5} {'saved/image':>12} {'saved':>8} {'per run':>8}  " +
          "  ".join(f"{'-j ' + str(j):>7}" for j in jobs))
    for norm in args.norms.split(","):
        for batch in map(int, args.batches.split(",")):
            saved = saved_bytes(norm, batch, args.size)
            run = data + saved
            print(f"{norm:<9} {batch:>5} {saved / batch / 2**20:>8.1f} MiB {saved / 2**30:>6.2f} G {run / 2**30:>6.1f} G  "
                  + "  ".join(f"{j * run / 2**30:>6.0f} G" for j in jobs), flush=True)
    print("(GiB; per run = data + saved activations, before compile's, cuDNN's and the allocator's own share)")


if __name__ == "__main__":
    main()
