"""Benchmark: one full SGD train step of the n=2 ResNet for every norm, ours beside PyTorch's built-ins.

  python bench/bench_norms.py [--batch 32] [--size 64] [--rounds 6] [--block 5] [--formats NCHW,channels_last]

Prints median ms/step in NCHW and channels_last (the training default), the ratio of each
from-scratch norm to its built-in counterpart (BIN: to our BN) and to the no-normalization
floor (nn). The from-scratch norms apply the ReLU that follows them in their own pass, as
in training (`resnorm.model.norm_relu`); the built-ins are followed by nn.ReLU. All variants are
timed in one run, round-robin, so the ratios are side by side; in each round a variant runs a
block of consecutive steps after a warm-up, as a training loop does (switching models at every
step measures cold caches, which training never sees; on this CPU that hid a 5-10% difference).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from resnorm.model import ResNet
from resnorm.norms import NORMS

# built-in references, registered under extra names for this benchmark only
BUILTINS = {
    "torch_bn": nn.BatchNorm2d,
    "torch_in": lambda c, **kw: nn.InstanceNorm2d(c, affine=True),
    "torch_ln": lambda c, **kw: nn.GroupNorm(1, c),
    "torch_gn": lambda c, num_groups=4, **kw: nn.GroupNorm(num_groups, c),
}
PAIRS = {"bn": "torch_bn", "in": "torch_in", "ln": "torch_ln", "gn": "torch_gn", "bin": "bn"}
ORDER = ["nn", "torch_bn", "bn", "bin", "torch_in", "in", "torch_ln", "ln", "torch_gn", "gn"]


def make_step(norm: str, fmt: torch.memory_format, batch: int, size: int, device: str):
    torch.manual_seed(0)
    model = ResNet(2, 25, norm="gn" if norm == "torch_gn" else norm).to(device)
    if norm == "torch_gn":                       # ResNet passes num_groups only to "gn": rebuild with the built-in
        NORMS["gn"], saved = BUILTINS["torch_gn"], NORMS["gn"]
        model = ResNet(2, 25, norm="gn").to(device)
        NORMS["gn"] = saved
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 25, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=5, help="steps in a row per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each block")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--formats", default="NCHW,channels_last", help="comma-separated subset of NCHW,channels_last")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, factory in BUILTINS.items():
        if name != "torch_gn":
            NORMS.setdefault(name, factory)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    formats = {f: fmt for f, fmt in {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}.items()
               if f in args.formats.split(",")}
    steps = {(n, f): make_step(n, fmt, args.batch, args.size, args.device) for n in ORDER for f, fmt in formats.items()}
    times = {k: [] for k in steps}
    for _ in range(args.rounds):              # round-robin: every variant sees the same machine state...
        for k, s in steps.items():
            for _ in range(args.warmup):      # ...but runs a block of steps in a row, warm, as in training
                s()
            for _ in range(args.block):
                sync()
                t0 = time.perf_counter()
                s()
                sync()
                times[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"one SGD step, n=2 ResNet, batch {args.batch}, {args.size}x{args.size}, {args.device}, "
          f"{args.threads} threads, median of {args.rounds} rounds x {args.block} steps")
    head = "".join(f" | {f + ' ms':>17} {'vs built-in':>16} {'vs floor':>8}" for f in formats)
    print(f"{'variant':<10}{head}")
    for n in ORDER:
        ref, row = PAIRS.get(n), ""
        for f in formats:
            vs = f"{med[(n, f)] / med[(ref, f)]:.2f}x vs {ref}" if ref else ""
            row += f" | {med[(n, f)]:17.1f} {vs:>16} {med[(n, f)] / med[('nn', f)]:7.2f}x"
        print(f"{n:<10}{row}")

if __name__ == "__main__":
    main()
