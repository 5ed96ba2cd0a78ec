"""Benchmark: the C++ kernels of two revisions in one process, forward + backward, at a network's shapes.

  python bench/bench_kernels.py --before REV [--arch resnet18] [--batch 32] [--size 64] [--reps 60]
                                [--norms bn,in,ln,gn] [--format channels_last]
  python bench/bench_kernels.py --before REV --check     # are the two revisions' results bit-identical?

bench_layers.py compares our layers with PyTorch's; between two runs of it this machine's speed
moves the ratios by up to a quarter, more than a kernel change is worth. This bench compiles
src/resnorm/kernels.cpp as it was at git revision REV and as it is now into two modules, loads
both into this process and times them in turn (the order alternating from rep to rep), every
norm layer of the network at its own shape, the caches flushed between calls (a 16 MB write), so
that the machine's drift falls on both alike. It times the kernels alone (norm_forward and
norm_backward called directly), not the module or autograd around them. For each norm: per
shape the median microseconds before and now, and over the network (each shape times its
number of layers) the ratio now / before with its 95% interval over reps.

--check runs every norm layer (bn, in, ln, gn, bin) through both revisions' kernels as training
does (the layer modules, forward and backward, with the kernels swapped in), at the network's
shapes and a few odd ones, in float32 and float64, NCHW and channels_last, with and without the
fused ReLU, in training and eval mode, and compares the output, the input and parameter
gradients and the running statistics bit for bit: the check a speed change must pass.

REV must be a revision with norm_forward / norm_backward (from 2026-11 on); before f965f21 the
forward also returned the coefficients, which that revision's backward takes. Each revision is
compiled once (30-60 s) into ~/.cache/torch_extensions.
"""
from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from resnorm.kernels import CFLAGS, SOURCE, compile_module
from resnorm.norms import _kernel_args, make_norm
from resnorm.stats import mean_interval

from bench_layers import norm_shapes


def build(source: str, tag: str):
    """kernels.cpp text compiled as its own module (named by its hash, so each is built once)."""
    import hashlib
    digest = hashlib.sha1((source + " ".join(CFLAGS)).encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"resnorm_bench_kernels_{digest}"
    folder.mkdir(exist_ok=True)
    path = folder / "kernels.cpp"
    if not path.exists() or path.read_text() != source:
        path.write_text(source)
    return compile_module(f"resnorm_bench_{tag}_{digest}", path, build_directory=str(folder))


def step(kernels, x, g, args, bias):
    """One forward and backward of a layer in `kernels`, with either revision's signatures."""
    kinds, groups, alphas, fixed_mean, fixed_var, run_mean, run_var, factor, unbias = args
    out = kernels.norm_forward(x, kinds, groups, alphas, fixed_mean, fixed_var, run_mean, run_var, factor, unbias,
                               bias, 1e-5, False)
    if len(out) == 3:                                   # before f965f21: (y, state, coef)
        kernels.norm_backward(g, x, out[1], out[2], kinds, groups, alphas, False, True, True)
    else:
        kernels.norm_backward(g, x, out[1], kinds, groups, alphas, bias, False, True, True)


def run_layer(layer, x, g):
    """A layer's output, its input and parameter gradients, and its buffers after one step."""
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    return [y, x.grad] + [p.grad for p in layer.parameters()] + list(layer.buffers())


def check(modules, shapes) -> int:
    """Compare the two kernel modules bit for bit (see the module's docstring); returns the mismatches."""
    import copy

    import resnorm.norms as norms
    saved, cases, bad = norms.cpu_kernels, 0, 0
    try:
        for norm in ("bn", "in", "ln", "gn", "bin"):
            for shape in shapes:
                c = shape[1]
                for dtype in (torch.float32, torch.float64):
                    for fmt in (torch.contiguous_format, torch.channels_last):
                        for relu in (False, True):
                            for training in (True, False):
                                torch.manual_seed(cases)
                                groups = next(k for k in (4, 2, 1) if c % k == 0)
                                layer = make_norm(norm, c, **({"num_groups": groups} if norm == "gn" else {}))
                                layer = layer.to(dtype).train(training)
                                layer.fused_relu = relu
                                with torch.no_grad():
                                    for p in layer.parameters():
                                        p.add_(torch.randn_like(p) * 0.1)
                                x = (torch.randn(shape, dtype=dtype) * 2 + 0.5).contiguous(memory_format=fmt)
                                g = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
                                results = []
                                for module in modules:
                                    norms.cpu_kernels = lambda m=module: m
                                    results.append(run_layer(copy.deepcopy(layer), x, g))
                                same = all(a is None and b is None or torch.equal(a, b) for a, b in zip(*results))
                                cases += 1
                                if not same:
                                    bad += 1
                                    print(f"differs: {norm} {tuple(shape)} {dtype} {fmt} relu={relu} "
                                          f"training={training}")
    finally:
        norms.cpu_kernels = saved
    print(f"{cases} cases, {bad} differ")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, metavar="REV", help="git revision to compare with")
    ap.add_argument("--arch", default="resnet18", choices=("resnet6n2", "resnet18", "resnet34", "resnet50"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--norms", default="bn,in,ln,gn")
    ap.add_argument("--format", default="channels_last", choices=("NCHW", "channels_last"))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--check", action="store_true", help="compare results bit for bit instead of timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        old_source = subprocess.run(["git", "show", f"{args.before}:src/resnorm/kernels.cpp"], check=True,
                                    capture_output=True, text=True, cwd=SOURCE.parent).stdout
    except subprocess.CalledProcessError as e:
        ap.error(f"--before {args.before}: {(e.stderr.strip() or 'no src/resnorm/kernels.cpp there').splitlines()[0]}")
    modules = (build(old_source, "before"), build(SOURCE.read_text(), "now"))
    if args.check:
        odd = [(3, 5, 7, 3), (2, 8, 1, 1), (1, 16, 5, 5), (4, 64, 2, 2), (2, 512, 2, 2), (5, 24, 9, 4)]
        shapes = sorted(norm_shapes(args.arch, args.batch, args.size)) + odd
        raise SystemExit(1 if check(modules, shapes) else 0)
    fmt = torch.channels_last if args.format == "channels_last" else torch.contiguous_format
    groups = 4 if args.arch == "resnet6n2" else 32
    shapes = norm_shapes(args.arch, args.batch, args.size)
    flush = torch.empty(4 << 20)
    print(f"kernels at {args.before} and now, {args.arch}, batch {args.batch}, {args.size}x{args.size}, "
          f"{args.format}, {args.threads} threads: forward + backward, caches flushed, median of {args.reps} reps, "
          f"microseconds")
    for norm in args.norms.split(","):
        totals = [[0.0] * args.reps, [0.0] * args.reps]
        print(f"\n{norm}{'layers':>27} {'before':>9} {'now':>9}   ratio")
        for shape, count in sorted(shapes.items(), key=lambda kv: -kv[0][2]):
            layer = make_norm(norm, shape[1], **({"num_groups": groups} if norm == "gn" else {}))
            x = torch.randn(shape).contiguous(memory_format=fmt)
            g = torch.randn(shape).contiguous(memory_format=fmt)
            params = ((layer.rho,) if norm == "bin" else ()) + (layer.weight, layer.bias)  # as its forward passes them
            kernel_args = _kernel_args(layer, x, params)
            times = ([], [])
            for r in range(args.reps + 2):                       # the first two are warm-up
                for i in ((0, 1) if r % 2 else (1, 0)):
                    flush.fill_(1.0)
                    t0 = time.perf_counter()
                    step(modules[i], x, g, kernel_args, layer.bias.detach())
                    if r >= 2:
                        times[i].append(time.perf_counter() - t0)
            for i in (0, 1):
                for r in range(args.reps):
                    totals[i][r] += count * times[i][r]
            before, now = (statistics.median(t) * 1e6 for t in times)
            print(f"  {str(shape):22} {count:3d} {before:9.0f} {now:9.0f}   {now / before:.2f}x")
        m, lo, hi = mean_interval([math.log(b / a) for a, b in zip(*totals)])
        print(f"  all {sum(shapes.values())} layers: now / before {math.exp(m):.2f}x "
              f"[95% interval {math.exp(lo):.2f}-{math.exp(hi):.2f}]")


if __name__ == "__main__":
    main()
