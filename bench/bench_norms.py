"""Benchmark: one full SGD train step of a ResNet for every norm, ours beside PyTorch's built-ins.

  python bench/bench_norms.py [--arch resnet6n2] [--batch 32] [--size 64] [--rounds 6] [--block 5]
                              [--formats NCHW,channels_last] [--before REV]

--arch resnet18 / resnet34 / resnet50 times torchvision's networks with each norm as their
`norm_layer` (widths 64-512, or 2048 in ResNet-50's bottlenecks; GN with 32 groups as in Wu & He),
so the norms' speed is measured beyond the 16-64 channels of the study's n=2 net. There the
norms are followed by torchvision's own nn.ReLU, ours as well as the built-ins.

Prints median ms/step in NCHW and channels_last (the training default), the ratio of each
from-scratch norm to its built-in counterpart (BIN: to our BN) with its 95% interval, and the
ratio to the no-normalization floor (nn). The ratio is paired by round: each round gives
median(ours) / median(reference) over its blocks, and the table shows the geometric mean of
those with a t interval over rounds (`resnorm.stats.mean_interval` on the logs), so that the
machine's drift from round to round (several percent here) cancels instead of swamping the
norms' own share of a step. --norms bn,ln times only those norms (with their references and nn).
The from-scratch norms apply the ReLU that follows them in their own pass, as
in training (`resnorm.model.norm_relu`); the built-ins are followed by nn.ReLU. All variants are
timed in one run, round-robin, so the ratios are side by side; in each round a variant runs a
block of consecutive steps after a warm-up, as a training loop does (switching models at every
step measures cold caches, which training never sees). --before REV adds the norms of an
earlier git revision as "<norm>@REV" rows, timed in the same run (ratio: before / now).
"""
from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

from resnorm.model import build_model
from resnorm.norms import NORMS
from resnorm.stats import mean_interval

# built-in references, registered under extra names for this benchmark only
BUILTINS = {
    "torch_bn": nn.BatchNorm2d,
    "torch_in": lambda c, **kw: nn.InstanceNorm2d(c, affine=True),
    "torch_ln": lambda c, **kw: nn.GroupNorm(1, c),
    "torch_gn": lambda c, num_groups=4, **kw: nn.GroupNorm(num_groups, c),
}
PAIRS = {"bn": "torch_bn", "in": "torch_in", "ln": "torch_ln", "gn": "torch_gn", "bin": "bn"}
ORDER = ["nn", "torch_bn", "bn", "bin", "torch_in", "in", "torch_ln", "ln", "torch_gn", "gn"]


# variants built by putting another class under one of ResNet's norm names: torch_gn (ResNet
# passes num_groups only to "gn") and "<norm>@<git revision>" (--before)
SWAPS: dict[str, tuple[str, type]] = {"torch_gn": ("gn", BUILTINS["torch_gn"])}


def norms_at(rev: str) -> types.ModuleType:
    """src/resnorm/norms.py as it was at git revision `rev`, loaded as its own module."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:src/resnorm/norms.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"norms_at_{rev}")
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"norms.py@{rev}", "exec"), mod.__dict__)
    return mod


def build(norm: str, arch: str = "resnet6n2") -> nn.Module:
    groups = 4 if arch == "resnet6n2" else 32       # the study's setting; Wu & He's 32 where widths allow
    if norm not in SWAPS:
        return build_model(arch, 25, norm, gn_groups=groups)
    name, cls = SWAPS[norm]
    NORMS[name], saved = cls, NORMS[name]
    try:
        return build_model(arch, 25, name, gn_groups=groups)
    finally:
        NORMS[name] = saved


def make_step(norm: str, fmt: torch.memory_format, batch: int, size: int, device: str, arch: str = "resnet6n2"):
    torch.manual_seed(0)
    model = build(norm, arch).to(device).to(memory_format=fmt)
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
    ap.add_argument("--arch", default="resnet6n2", choices=("resnet6n2", "resnet18", "resnet34", "resnet50"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=5, help="steps in a row per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each block")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--formats", default="NCHW,channels_last", help="comma-separated subset of NCHW,channels_last")
    ap.add_argument("--before", metavar="REV", help="also time the norms of git revision REV (e.g. 5353712)")
    ap.add_argument("--norms", help="comma-separated from-scratch norms to time (default: all), with their references")
    args = ap.parse_args()
    order = list(ORDER)
    if args.norms:
        wanted = set(args.norms.split(","))
        unknown = wanted - set(PAIRS)
        if unknown:
            ap.error(f"--norms: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PAIRS)}")
        keep = {"nn"} | wanted | {PAIRS[n] for n in wanted}
        order = [n for n in order if n in keep]
    if args.before:
        old = norms_at(args.before)
        for n in ("bn", "in", "bin", "ln", "gn"):
            SWAPS[f"{n}@{args.before}"] = (n, old.NORMS[n])
            PAIRS[f"{n}@{args.before}"] = n
            order.append(f"{n}@{args.before}")
    torch.set_num_threads(args.threads)
    for name, factory in BUILTINS.items():
        if name != "torch_gn":
            NORMS.setdefault(name, factory)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    formats = {f: fmt for f, fmt in {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}.items()
               if f in args.formats.split(",")}
    steps = {(n, f): make_step(n, fmt, args.batch, args.size, args.device, args.arch) for n in order for f, fmt in formats.items()}
    times = {k: [] for k in steps}                # ms per step, all rounds
    per_round = {k: [] for k in steps}            # each round's median
    for _ in range(args.rounds):              # round-robin: every variant sees the same machine state...
        for k, s in steps.items():
            for _ in range(args.warmup):      # ...but runs a block of steps in a row, warm, as in training
                s()
            block = []
            for _ in range(args.block):
                sync()
                t0 = time.perf_counter()
                s()
                sync()
                block.append((time.perf_counter() - t0) * 1e3)
            times[k] += block
            per_round[k].append(statistics.median(block))
    med = {k: statistics.median(v) for k, v in times.items()}

    def paired_ratio(a, b) -> str:
        """Geometric mean over rounds of a / b, with its 95% t interval."""
        m, lo, hi = mean_interval([math.log(x / y) for x, y in zip(per_round[a], per_round[b])])
        bounds = f" [{math.exp(lo):.2f}-{math.exp(hi):.2f}]" if not math.isnan(lo) else ""
        return f"{math.exp(m):.2f}x{bounds}"

    net = "n=2 ResNet" if args.arch == "resnet6n2" else f"torchvision {args.arch}"
    print(f"one SGD step, {net}, batch {args.batch}, {args.size}x{args.size}, {args.device}, "
          f"{args.threads} threads, median of {args.rounds} rounds x {args.block} steps")
    head = "".join(f" | {f + ' ms':>17} {'vs ref [95% interval]':>31} {'vs floor':>8}" for f in formats)
    print(f"{'variant':<14}{head}")
    for n in order:
        ref, row = PAIRS.get(n), ""
        for f in formats:
            vs = f"{paired_ratio((n, f), (ref, f))} vs {ref}" if ref in order else ""
            row += f" | {med[(n, f)]:17.1f} {vs:>31} {med[(n, f)] / med[('nn', f)]:7.2f}x"
        print(f"{n:<14}{row}")

if __name__ == "__main__":
    main()
