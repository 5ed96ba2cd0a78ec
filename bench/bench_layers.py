"""Benchmark: a network's norm layers one at a time, forward + backward, ours beside PyTorch's built-ins.

  python bench/bench_layers.py [--arch resnet18] [--batch 32] [--size 64] [--norms bn,in,ln,gn]
                               [--reps 15] [--formats NCHW,channels_last]

bench_norms.py times whole SGD steps, where the convolutions take 90% of the time and vary by
several percent from step to step on this machine: a difference of a few percent in the norms is
lost there. This bench times the norm layers themselves, at the shapes the network gives them
(found by running it once) and as the network calls them: between two calls the caches are
flushed (a 16 MB write, as a convolution's working set does), and every call is a forward and a
backward of the layer alone. Ours and the built-in run in turn, shape by shape, rep by rep.

For each norm: per shape the median microseconds of ours and of the built-in and their ratio;
then the whole network's norm time per step (each shape's median times the number of layers of
that shape) with the ratio's 95% interval over reps (`resnorm.stats.mean_interval` on the logs of
each rep's ratio of totals). The norms are timed without the ReLU that follows them (torchvision's
blocks keep their own nn.ReLU, for ours and the built-ins alike).

--split adds a column for ours without autograd: the C++ kernels' forward and backward called
directly with their arguments (`norms._kernel_forward`, `norm_backward`), so that the cost of
the Python autograd.Function round trip is the difference to the "ours" column.
"""
from __future__ import annotations

import argparse
import collections
import math
import statistics
import time

import torch
from torch import nn

from resnorm.model import build_model
from resnorm.norms import _kernel_forward, _kernels_for, make_norm
from resnorm.stats import mean_interval

BUILTINS = {
    "bn": lambda c, groups: nn.BatchNorm2d(c),
    "in": lambda c, groups: nn.InstanceNorm2d(c, affine=True),
    "ln": lambda c, groups: nn.GroupNorm(1, c),
    "gn": lambda c, groups: nn.GroupNorm(groups, c),
}


def norm_shapes(arch: str, batch: int, size: int) -> collections.Counter:
    """(N, C, H, W) of every norm layer's input in one forward pass of the network, with counts."""
    model = build_model(arch, 25, "torch_bn")
    shapes = collections.Counter()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, args: shapes.update([tuple(args[0].shape)]))
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size))
    return shapes


def kernels_only(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    """Our layer's forward and backward in the C++ kernels, called directly (no autograd)."""
    kernels = _kernels_for(x)
    if kernels is None:
        raise SystemExit("--split: the C++ kernels are not available here")
    x = x.detach()
    _, (k, args) = _kernel_forward(kernels, layer, x, (layer.weight, layer.bias))
    k.norm_backward(g, x, *args, False, True, True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18", choices=("resnet6n2", "resnet18", "resnet34", "resnet50"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--norms", default="bn,in,ln,gn", help="comma-separated subset of bn,in,ln,gn")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--formats", default="NCHW,channels_last", help="comma-separated subset of NCHW,channels_last")
    ap.add_argument("--split", action="store_true", help="also time ours without autograd (the kernels called directly)")
    args = ap.parse_args()
    norms = args.norms.split(",")
    unknown = set(norms) - set(BUILTINS)
    if unknown:
        ap.error(f"--norms: unknown {', '.join(sorted(unknown))}; choose from {', '.join(BUILTINS)}")
    torch.set_num_threads(args.threads)
    groups = 4 if args.arch == "resnet6n2" else 32
    shapes = norm_shapes(args.arch, args.batch, args.size)
    flush = torch.empty(4 << 20)                         # 16 MB
    formats = {f: fmt for f, fmt in {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}.items()
               if f in args.formats.split(",")}
    net = "n=2 ResNet" if args.arch == "resnet6n2" else f"torchvision {args.arch}"
    print(f"norm layers of {net}, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads: forward + "
          f"backward of each layer alone, caches flushed between calls, median of {args.reps} reps, microseconds")
    for fname, fmt in formats.items():
        for norm in norms:
            variants = ("ours", "builtin") + (("kernels",) if args.split else ())
            times = {(v, s): [] for v in variants for s in shapes}
            cases = {}
            for s in shapes:
                torch.manual_seed(0)
                ours = make_norm(norm, s[1], **({"num_groups": groups} if norm == "gn" else {}))
                ref = BUILTINS[norm](s[1], groups)
                x = torch.randn(s).contiguous(memory_format=fmt).requires_grad_()
                g = torch.randn(s).contiguous(memory_format=fmt)
                cases[s] = (ours, ref, x, g)
            for _ in range(args.reps + 2):                # the first two are warm-up
                for s, (ours, ref, x, g) in cases.items():
                    for v, run in (("ours", lambda: ours(x).backward(g)), ("builtin", lambda: ref(x).backward(g)),
                                   ("kernels", lambda: kernels_only(ours, x, g)))[:len(variants)]:
                        flush.fill_(1.0)
                        t0 = time.perf_counter()
                        run()
                        times[(v, s)].append((time.perf_counter() - t0) * 1e6)
                        x.grad = None
            for key in times:
                del times[key][:2]
            print(f"\n{norm} ({fname})      layers      ours  built-in   ratio" + ("   kernels" if args.split else ""))
            for s, count in sorted(shapes.items(), key=lambda kv: -kv[0][2]):
                a, b = (statistics.median(times[(v, s)]) for v in ("ours", "builtin"))
                k = f" {statistics.median(times[('kernels', s)]):9.0f}" if args.split else ""
                print(f"  {str(s):22} {count:3d} {a:9.0f} {b:9.0f}   {a / b:.2f}x{k}")
            totals = {v: [sum(count * times[(v, s)][r] for s, count in shapes.items()) for r in range(args.reps)]
                      for v in ("ours", "builtin")}
            m, lo, hi = mean_interval([math.log(a / b) for a, b in zip(totals["ours"], totals["builtin"])])
            a, b = (sum(count * statistics.median(times[(v, s)]) for s, count in shapes.items()) / 1000
                    for v in ("ours", "builtin"))
            print(f"  all {sum(shapes.values())} layers, ms per step  {a:7.2f} {b:9.2f}   {math.exp(m):.2f}x "
                  f"[95% interval {math.exp(lo):.2f}-{math.exp(hi):.2f}]")


if __name__ == "__main__":
    main()
