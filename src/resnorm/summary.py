"""Model summary: layers, output shapes, parameters and multiply-accumulates per image.

  python -m resnorm.summary --n 2 --classes 25 --size 256 --norm bn
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from .io import positive_int
from .model import ResNet
from .norms import NORMS


def summarize(model: nn.Module, size: int) -> dict:
    """Run one (1, 3, size, size) image through `model`, recording every leaf module."""
    rows: list[dict] = []
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            macs = 0
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
                macs = output.numel() * k
            elif isinstance(module, nn.Linear):
                macs = module.in_features * module.out_features
            rows.append({"layer": name, "type": type(module).__name__, "output": list(output.shape[1:]),
                         "params": sum(p.numel() for p in module.parameters(recurse=False)), "macs": macs,
                         "weighted": isinstance(module, (nn.Conv2d, nn.Linear))})
        return fn

    for name, m in model.named_modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook(name)))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return {
        "rows": rows,
        "params": sum(p.numel() for p in model.parameters()),
        "macs": sum(r["macs"] for r in rows),
        "weighted_layers": sum(1 for r in rows if r["weighted"]),   # shortcut convs included
        # the depth in a ResNet's name: weighted layers on the main path (projection shortcuts not counted)
        "depth": sum(1 for r in rows if r["weighted"] and not any(k in r["layer"] for k in ("shortcut", "downsample"))),
        "input": [3, size, size],
    }


def model_summary(n: int, num_classes: int, size: int, norm: str = "bn", gn_groups: int = 4,
                  shortcut: str = "A", block: str = "basic") -> dict:
    s = summarize(ResNet(n, num_classes, norm=norm, shortcut=shortcut, gn_groups=gn_groups, block=block), size)
    s.update({"n": n, "num_classes": num_classes, "norm": norm, "shortcut": shortcut, "block": block})
    return s


def arch_summary(arch: str, num_classes: int, size: int, norm: str = "bn", **options) -> dict:
    """`summarize` of any `build_model` architecture (torchvision's ResNet-18/34/50 included)."""
    from .model import build_model
    s = summarize(build_model(arch, num_classes, norm, **options), size)
    s.update({"arch": arch, "num_classes": num_classes, "norm": norm})
    return s


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from .params import load_params

    defaults = None
    try:
        defaults = load_params()
    except Exception:
        pass
    ap = argparse.ArgumentParser(prog="python -m resnorm.summary", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet6n2", choices=("resnet6n2", "resnet18", "resnet34", "resnet50"),
                    help="resnet6n2 (this study's net, --n) or torchvision's ResNet-18/34/50")
    ap.add_argument("--n", type=positive_int, default=defaults.model.n if defaults else 2)
    ap.add_argument("--classes", type=positive_int, default=25)
    ap.add_argument("--size", type=positive_int, default=defaults.data.image_size if defaults else 256)
    ap.add_argument("--norm", choices=tuple(NORMS), default=defaults.norm if defaults else "bn")
    ap.add_argument("--shortcut", choices=("A", "B"), default=defaults.model.shortcut if defaults else "A",
                    help="A: identity + zero-padding (6n+2 layers); B: 1x1 projections (6n+4)")
    ap.add_argument("--all", action="store_true", help="every layer, not just the totals")
    args = ap.parse_args(argv)
    if args.size % 4:
        ap.error("--size must be divisible by 4")
    if args.arch == "resnet6n2":
        s = model_summary(args.n, args.classes, args.size, args.norm, shortcut=args.shortcut)
        name = f"ResNet-{6 * args.n + 2}"
        what = f"(n={args.n}, shortcut option {args.shortcut}; every conv and linear layer counted)"
    else:
        s = arch_summary(args.arch, args.classes, args.size, args.norm)
        name = f"torchvision {args.arch}"
        what = (f"on the main path, {s['weighted_layers'] - s['depth']} more in projection shortcuts; "
                f"{s['weighted_layers']} in all")
    con = Console()
    if args.all:
        t = Table(title=f"{name} ({args.norm}) at {args.size}x{args.size}")
        for c in ("layer", "type", "output", "params", "MACs"):
            t.add_column(c, justify="right" if c in ("params", "MACs") else "left")
        for r in s["rows"]:
            t.add_row(r["layer"], r["type"], "x".join(map(str, r["output"])), f"{r['params']:,}", f"{r['macs']:,}")
        con.print(t)
    layers = s["weighted_layers"] if args.arch == "resnet6n2" else s["depth"]
    con.print(f"{name}: {layers} weighted layers {what}, {s['params']:,} parameters, "
              f"{s['macs'] / 1e6:,.1f} M multiply-accumulates per {args.size}x{args.size} image, "
              f"{args.classes} classes, norm {args.norm}")


if __name__ == "__main__":
    main()
