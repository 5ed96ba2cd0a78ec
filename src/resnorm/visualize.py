"""Stage `visualize`: inside the study's best model (models/best/best.pt, chosen by the gradcam stage).

  python -m resnorm.visualize

Writes (linked from the report; image plots in `dvc plots show`):
  plots/visualize/kernels.png        the first conv layer's kernels as RGB, each scaled to its own range
  plots/visualize/feature_maps.png   the stem's and each stage's output for `visualize.images` fixed
                                     images of `gradcam.split`: the `visualize.channels` channels
                                     most active over those images, the same channels for every image
  plots/visualize/activations.png    every norm layer in depth order: the mean and the standard
                                     deviation of its input and of its output (before the ReLU),
                                     over up to `visualize.stat_images` images, stage by stage
  plots/visualize/augmentation.png   `visualize.images` train images as prepared, then as the training
                                     loop feeds them to the model under the best run's augmentation
                                     settings (`train.augment` ...), in AUGMENTED_DRAWS random draws
  metrics/visualize.json             those numbers, per layer and per stage

The model runs in eval mode, as it classifies: BN normalizes with its running statistics, so
"after" shows what the trained network feeds forward, not a fresh batch's exact zero mean.
Where a from-scratch norm applies the following ReLU in its own pass, its output is
recomputed without it, so "after the norm" means the same thing for every scheme.
"""
from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .assignment import augmentation
from .data import EpochBatches, Split, load_split, to_tensor
from .io import UserError, atomic_dir, console, no_options, run_cli, save_figure, write_json
from .model import feature_points, model_from_config, stages
from .norms import NORMS
from .params import Params, TrainParams, load_params
from .train import load_checkpoint

MODEL = Path("models/best/best.pt")
OUT = Path("plots/visualize")
NUMBERS = Path("metrics/visualize.json")


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every normalization layer (any scheme, the built-in BN and nn's identity too)."""
    kinds = tuple(set(NORMS.values()))
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def stage_of(model: nn.Module, name: str) -> str:
    """'stem', 'stage1'... for a module name: the stage whose subtree holds it; after the last stage, the last."""
    module = model.get_submodule(name)
    for i, s in enumerate(stages(model)):
        if any(module is m for m in s.modules()):
            return f"stage{i + 1}"
    return "stem" if name.startswith(("conv1", "norm1", "bn1")) else f"stage{len(stages(model))}"


STAT_CHUNK = 32     # images per forward pass of `activation_stats`
AUGMENTED_DRAWS = 5  # columns of augmentation.png after the image as prepared


class Moments:
    """Count, mean and sum of squared deviations of everything `add`ed, in float64, merged chunk by
    chunk (Chan, Golub & LeVeque's pairwise update), so the statistics over many images need one
    chunk's activations at a time: at 256 px one pass over 256 images held 7.7 GiB."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().double()
        n, mean = t.numel(), float(t.mean())
        m2 = float(t.var(unbiased=False)) * n
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    @property
    def std(self) -> float:
        """The population standard deviation (divided by the count, as `torch.std(unbiased=False)`)."""
        return math.sqrt(self.m2 / self.n) if self.n else 0.0


@torch.no_grad()
def activation_stats(model: nn.Module, x: torch.Tensor, chunk: int = STAT_CHUNK) -> list[dict]:
    """Per norm layer, in the order the forward pass reaches them: mean and std of the input and of
    the output before any ReLU (a fused ReLU is switched off for a second, exact, evaluation), over
    all of x, which goes through the model `chunk` images at a time (eval mode: no image affects
    another, so the chunks change nothing but the memory)."""
    seen: dict[str, tuple[Moments, Moments]] = {}          # in the order the forward pass reaches them
    busy = [False]
    names = {id(m): n for n, m in norm_layers(model)}

    def hook(module, inputs, output):
        if busy[0]:
            return
        if getattr(module, "fused_relu", False):
            busy[0], module.fused_relu = True, False
            try:
                output = module(inputs[0])
            finally:
                busy[0], module.fused_relu = False, True
        before, after = seen.setdefault(names[id(module)], (Moments(), Moments()))
        before.add(inputs[0])
        after.add(output)

    hooks = [m.register_forward_hook(hook) for _, m in norm_layers(model)]
    try:
        for i in range(0, len(x), chunk):
            model(x[i:i + chunk])
    finally:
        for h in hooks:
            h.remove()
    return [{"layer": name, "stage": stage_of(model, name), "kind": type(model.get_submodule(name)).__name__,
             "mean_before": before.mean, "std_before": before.std, "mean_after": after.mean, "std_after": after.std}
            for name, (before, after) in seen.items()]


def per_stage(rows: list[dict]) -> list[dict]:
    """The layers' figures averaged within each stage, in stage order."""
    order = list(dict.fromkeys(r["stage"] for r in rows))
    keys = ("mean_before", "std_before", "mean_after", "std_after")
    return [{"stage": s, "layers": sum(r["stage"] == s for r in rows),
             **{k: float(np.mean([r[k] for r in rows if r["stage"] == s])) for k in keys}} for s in order]


@torch.no_grad()
def feature_maps(model: nn.Module, x: torch.Tensor, channels: int) -> list[dict]:
    """Per feature point (stem, stage1...): its output for x and the `channels` channels with the
    highest mean activation over x (one choice for every image, so the rows compare)."""
    outs = {}
    points = feature_points(model)

    def keeper(name):
        def keep(module, inputs, output):         # returns nothing: the forward pass goes on unchanged
            outs[name] = output.detach().float()
        return keep
    hooks = [m.register_forward_hook(keeper(name)) for name, m in points]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    result = []
    for name, _ in points:
        o = outs[name]
        top = o.mean((0, 2, 3)).argsort(descending=True)[:channels]
        result.append({"name": name, "maps": o[:, top].numpy(), "channels": [int(c) for c in top],
                       "width": int(o.shape[1]), "size": list(o.shape[2:])})
    return result


def plot_kernels(path: Path, weight: torch.Tensor) -> dict:
    """The first conv's kernels (out, 3, k, k) as an RGB grid, each kernel min-max scaled on its own."""
    import matplotlib.pyplot as plt

    w = weight.detach().float()
    lo = w.amin((1, 2, 3), keepdim=True)
    span = (w.amax((1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
    rgb = ((w - lo) / span).permute(0, 2, 3, 1).numpy()
    n = len(rgb)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(cols * 0.8 + 0.4, 3.6), rows * 0.8 + 0.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(rgb[i] if rgb.shape[-1] == 3 else rgb[i][..., 0], interpolation="nearest",
                      cmap=None if rgb.shape[-1] == 3 else "gray")
    k = tuple(weight.shape[2:])
    fig.suptitle(f"first conv: {n} kernels {k[0]}x{k[1]}\n(RGB, each scaled to its own range)", fontsize=9)
    save_figure(fig, path, dpi=110)
    norms = w.flatten(1).norm(dim=1)
    return {"kernels": n, "size": list(k), "weight_norm_mean": float(norms.mean()), "weight_norm_max": float(norms.max())}


def plot_feature_maps(path: Path, images: np.ndarray, points: list[dict]) -> None:
    """Rows: each image's stem and stages; columns: a label, the image (on its first row), the channels."""
    import matplotlib.pyplot as plt

    n_img, n_pts = len(images), len(points)
    ch = max(len(p["channels"]) for p in points)
    fig, axes = plt.subplots(n_img * n_pts, ch + 2, figsize=((ch + 2) * 0.95, n_img * n_pts * 1.0 + 0.5),
                             squeeze=False, gridspec_kw={"width_ratios": [0.8, 1] + [1] * ch})
    for i in range(n_img):
        for j, p in enumerate(points):
            row = axes[i * n_pts + j]
            for ax in row:
                ax.axis("off")
            row[0].text(1.0, 0.5, f"{p['name']}\n{p['width']} ch, {p['size'][0]}x{p['size'][1]}", fontsize=7,
                        ha="right", va="center", transform=row[0].transAxes)
            if j == 0:
                row[1].imshow(images[i], interpolation="nearest")
                row[1].set_title(f"image {i + 1}", fontsize=7)
            for k, c in enumerate(p["channels"]):
                row[k + 2].imshow(p["maps"][i, k], cmap="viridis", interpolation="nearest")
                row[k + 2].set_title(f"ch {c}", fontsize=6, pad=2)
    fig.suptitle("feature maps: the most active channels of the stem and of each stage "
                 "(each map on its own colour scale)", fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.99, top=1 - 0.75 / fig.get_figheight(), bottom=0.01, hspace=0.3,
                        wspace=0.08)
    save_figure(fig, path, dpi=100)


def plot_activations(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib.pyplot as plt

    x = np.arange(1, len(rows) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, label in ((axes[0], "mean", "mean"), (axes[1], "std", "standard deviation")):
        ax.plot(x, [r[f"{key}_before"] for r in rows], "o-", color="#999999", label="before the norm (its input)")
        ax.plot(x, [r[f"{key}_after"] for r in rows], "o-", color="#1f77b4", label="after the norm (before ReLU)")
        if key == "std":
            ax.set_yscale("log")
        bounds = [i for i in range(1, len(rows)) if rows[i]["stage"] != rows[i - 1]["stage"]]
        for b in bounds:
            ax.axvline(b + 0.5, color="#cccccc", ls="--", lw=0.8)
        starts = [0] + bounds
        for s, e in zip(starts, bounds + [len(rows)]):
            ax.text((s + e + 1) / 2, 1.01, rows[s]["stage"], transform=ax.get_xaxis_transform(), ha="center",
                    fontsize=7, color="#555555")
        ax.set_xlabel("norm layer, in depth order")
        ax.set_ylabel(f"activation {label}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def augmented_views(x: np.ndarray, t: TrainParams, mean: list[float], std: list[float], seed: int,
                    draws: int = AUGMENTED_DRAWS) -> np.ndarray:
    """(images, 1 + draws, H, W, 3) in [0, 1]: each uint8 image as prepared, then `draws` times as the
    training loop makes it under `t` (`EpochBatches.training`: epochs 1, 2, ... of a run with `seed`,
    the images as one batch), normalization undone, so cutout's square shows the train mean."""
    images = Split("shown", np.array(x), np.zeros(len(x), dtype=np.int64))
    m, s = (torch.tensor(v).view(1, 3, 1, 1) for v in (mean, std))
    views = [images.x / 255.0]
    for epoch in range(draws):
        batches = EpochBatches.training(images, len(images), mean, std, t, seed=seed, epoch=epoch)
        seen, _ = batches.to(batches[0])
        views.append((seen * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    return np.stack(views, 1)


def plot_augmentation(path: Path, views: np.ndarray, title: str) -> None:
    import matplotlib.pyplot as plt

    n_img, n_col = views.shape[:2]
    fig, axes = plt.subplots(n_img, n_col, figsize=(n_col * 1.5, n_img * 1.5 + 0.6), squeeze=False)
    for i in range(n_img):
        for j in range(n_col):
            axes[i, j].imshow(views[i, j], interpolation="nearest")
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title("as prepared" if j == 0 else f"draw {j}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.6 / fig.get_figheight(), wspace=0.05,
                        hspace=0.05)
    save_figure(fig, path, dpi=100)


def run_train_settings(p: Params, best: dict) -> TrainParams:
    """The `train` settings the best run trained with, which its checkpoint carries (so that editing
    another variant in params.yaml does not make this stage stale); the base ones of params.yaml for a
    checkpoint of older code."""
    if "train" not in best:
        return p.train
    known = {f.name for f in fields(TrainParams)}
    return TrainParams(**{k: v for k, v in best["train"].items() if k in known})


def visualize(p: Params) -> dict:
    if not MODEL.exists():
        raise UserError(f"{MODEL}: no best model yet; run `dvc repro gradcam` first")
    best = load_checkpoint(MODEL)
    config = best["model_config"]
    model = model_from_config(config)
    model.load_state_dict(best["model"])
    model.eval()
    torch.set_num_threads(p.train.threads)
    split = load_split(p.gradcam.split)
    if len(split) == 0:
        raise UserError(f"gradcam.split = {p.gradcam.split}: the split is empty; nothing to show")
    v = p.visualize
    x_stats = to_tensor(np.array(split.x[:v.stat_images]), best["mean"], best["std"])   # a copy: the split is a read-only map
    rows = activation_stats(model, x_stats)
    shown = np.array(split.x[:v.images])
    points = feature_maps(model, to_tensor(shown, best["mean"], best["std"]), v.channels)
    title = (f"{best.get('name', 'best run')} ({config.get('arch', 'resnet6n2')}, norm {config['norm']}): "
             f"activations over {len(x_stats)} {p.gradcam.split} images, eval mode")
    t = run_train_settings(p, best)
    train_images = load_split("train").x[:v.images]
    views = augmented_views(train_images, t, best["mean"], best["std"], best.get("seed", p.seed))
    augmented = augmentation(t)
    with atomic_dir(OUT) as tmp:
        kernels = plot_kernels(tmp / "kernels.png", model.conv1.weight)
        plot_feature_maps(tmp / "feature_maps.png", np.asarray(shown), points)
        plot_activations(tmp / "activations.png", rows, title)
        plot_augmentation(tmp / "augmentation.png", views,
                          f"{best.get('name', 'best run')}: training augmentation: {augmented}")
    numbers = {"run": best.get("name"), "norm": config["norm"], "arch": config.get("arch", "resnet6n2"),
               "split": p.gradcam.split, "stat_images": len(x_stats), "kernels": kernels,
               "feature_maps": [{k: pt[k] for k in ("name", "width", "size", "channels")} for pt in points],
               "stages": per_stage(rows), "layers": rows,
               "augmentation": {"settings": augmented, "images": len(views), "draws": views.shape[1] - 1}}
    write_json(NUMBERS, numbers)
    console.print(f"visualize: {OUT}/kernels.png, feature_maps.png, activations.png ({len(rows)} norm layers), "
                  f"augmentation.png; numbers in {NUMBERS}")
    return numbers


def main(argv: list[str]) -> None:
    no_options(argv, "visualize", __doc__, "visualize.*, gradcam.split and train.* (for a checkpoint without its own)")
    visualize(load_params())


if __name__ == "__main__":
    run_cli(main)
