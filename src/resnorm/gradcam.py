"""Stage `gradcam`: what the best variant looks at, with the `grad-cam` package.

The best variant is chosen by mean validation accuracy over its seeds (from
metrics/study/*.json), then its best seed. For each class in `gradcam.classes`,
up to `gradcam.per_kind` correctly and wrongly classified validation images get
a Grad-CAM map for their true class over the last 2n conv layers (stage 3),
mean-aggregated by the package, superimposed on the image.

Outputs under plots/gradcam/: <class>.png (grid), overlays/<class>/*.png, index.json.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .data import load_classes, load_split, to_tensor
from .io import UserError, atomic_dir, console, read_json, run_cli, save_figure, write_json
from .metrics import predict
from .params import Params, load_params
from .train import build_model, load_checkpoint, run_paths

OUT = Path("plots/gradcam")
DISPLAY = 128   # overlays are upscaled to this many pixels a side so small inputs stay visible


def best_run(metrics_dir: Path = Path("metrics/study")) -> tuple[str, str, dict[str, float]]:
    """(variant, run) with the best mean val accuracy, then the best seed; plus every variant's mean."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for f in sorted(metrics_dir.glob("*.json")):
        m = read_json(f)
        if m.get("val"):
            by_variant[m["variant"]].append(m)
    if not by_variant:
        raise UserError(f"{metrics_dir}: no evaluated run with scores; run the study first")
    means = {v: statistics.fmean(m["val"]["accuracy"] for m in ms) for v, ms in by_variant.items()}
    variant = max(sorted(means), key=lambda v: means[v])
    run = max(sorted(by_variant[variant], key=lambda m: m["seed"]), key=lambda m: m["val"]["accuracy"])
    return variant, run["run"], means


def cams(model, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] for the given target classes over the stage-3 convs."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=model.gradcam_layers()) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map in jet colours laid over a uint8 HWC image, both upscaled to DISPLAY pixels."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    img = cv2.resize(image, (DISPLAY, DISPLAY), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255
    heat = cv2.resize(cam.astype(np.float32), (DISPLAY, DISPLAY), interpolation=cv2.INTER_LINEAR)
    return show_cam_on_image(np.clip(img, 0, 1), np.clip(heat, 0, 1), use_rgb=True)


def grid(path: Path, title: str, cells: list[list[tuple[np.ndarray, str]]], row_titles: list[str], cols: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cells), cols, figsize=(2.2 * cols, 2.5 * len(cells)), squeeze=False)
    for r, row in enumerate(cells):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                ax.imshow(row[c][0])
                ax.set_title(row[c][1], fontsize=7)
            elif c == len(row):
                ax.text(0.5, 0.5, "none" if not row else f"only {len(row)}", ha="center", va="center", fontsize=9)
        axes[r][0].text(-0.1, 0.5, row_titles[r], transform=axes[r][0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=60)


def gradcam(p: Params) -> dict:
    from PIL import Image

    variant, run, means = best_run()
    v = p.variant(variant)
    paths = run_paths(variant, int(run.rsplit("-", 1)[1]))
    best = load_checkpoint(paths.best)
    classes = load_classes()
    unknown = [c for c in p.gradcam.classes if c not in classes]
    if unknown:
        raise UserError(f"gradcam.classes: {', '.join(map(repr, unknown))} not in the prepared data set; "
                        f"known: {', '.join(classes)}")
    torch.set_num_threads(v.train.threads)
    model = build_model(p, v.norm, len(classes))
    model.load_state_dict(best["model"])
    model.eval()
    val = load_split("val")
    _, pred, prob = predict(model, val, best["mean"], best["std"], 128, torch.device("cpu"))
    k = p.gradcam.per_kind
    index = {"variant": variant, "run": run, "mean_val_accuracy": round(means[variant], 6),
             "target_layers": [n for n, m in model.named_modules() if any(m is t for t in model.gradcam_layers())],
             "classes": {}}
    with atomic_dir(OUT) as tmp:
        for name in p.gradcam.classes:
            c = classes.index(name)
            rows_idx = np.flatnonzero(val.y == c)
            kinds = {"correct": [i for i in rows_idx if pred[i] == c][:k],
                     "wrong": [i for i in rows_idx if pred[i] != c][:k]}
            entry, cells = {}, []
            for kind, idx in kinds.items():
                items, row = [], []
                if idx:
                    x = to_tensor(val.x[idx], best["mean"], best["std"])
                    maps = cams(model, x, [c] * len(idx))
                    for j, i in enumerate(idx):
                        img = overlay(np.asarray(val.x[i]), maps[j])
                        rel = Path("overlays") / name / f"{kind}_{j}.png"
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(img).save(tmp / rel)
                        items.append({"val_index": int(i), "true": name, "predicted": classes[pred[i]],
                                      "confidence": round(float(prob[i, pred[i]]), 4),
                                      "true_class_probability": round(float(prob[i, c]), 4),
                                      "overlay": str(rel), "map_shape": list(maps[j].shape)})
                        row.append((img, f"pred {classes[pred[i]][:18]}\np={prob[i, pred[i]]:.2f}"))
                if len(idx) < k:
                    console.print(f"gradcam: class {name}: only {len(idx)} {kind} validation image(s) of {k}")
                entry[kind] = items
                cells.append(row)
            entry["note"] = "; ".join(f"only {len(entry[kd])} {kd} of {k}" for kd in kinds if len(entry[kd]) < k)
            grid(tmp / f"{name}.png", f"{name}: Grad-CAM of the true class, {run}", cells,
                 [f"correct ({len(entry['correct'])})", f"wrong ({len(entry['wrong'])})"], k)
            index["classes"][name] = entry
        write_json(tmp / "index.json", index)
    console.print(f"gradcam: best variant {variant} (mean val accuracy {means[variant]:.3f}), run {run}; "
                  f"{len(p.gradcam.classes)} class grids in {OUT}/")
    return index


def main(argv: list[str]) -> None:
    gradcam(load_params())


if __name__ == "__main__":
    run_cli(main)
