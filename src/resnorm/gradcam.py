"""Stage `gradcam`: what the best variant looks at, with the `grad-cam` package, and what that shows.

The best variant is chosen by mean validation accuracy over its seeds (from
metrics/study/*.json; validation is what selects models here), then its best seed. For
each class in `gradcam.classes`, up to `gradcam.per_kind` correctly and wrongly
classified images of `gradcam.split` (default test: val already picked the model and
its checkpoint) get a Grad-CAM map for their true class over the last 2n conv layers
(stage 3, a quarter of the input size: 8x8 at 32 px, 64x64 at 256 px; with a torchvision
ResNet, the last stage's convs, at 1/32 of the input size), mean-aggregated
by the package. Wrong ones also get the map of the class they were taken for. The split is
scored as `evaluate` scores it (`predict_as_validated`: the run's device, precision, memory
layout and batch size), so right and wrong are evaluate's; the maps are computed in fp32 on
that device.

Each map is measured (`map_stats`): how concentrated it is (the share of its mass in
its top 10% of pixels; 0.10 for a flat map), how much of it lies in the central quarter
of the image (0.25 for a flat map) and its centre of mass. `analysis` turns those
numbers into the report's per-class and overall observations.

Outputs under plots/gradcam/: grids/<class>.png (image | heatmap with colour bar | overlay for
every example; `dvc plots show` draws these), overlays/<class>/*.png, index.json (every
example and its numbers).
"""
from __future__ import annotations

import shutil
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from .data import load_classes, load_split, to_tensor
from .io import UserError, atomic_dir, atomic_path, console, no_options, read_json, run_cli, save_figure, write_json
from .evaluate import predict_as_validated, scoring_model
from .params import Params, load_params
from .stats import Comparison, welch
from .model import gradcam_layers
from .train import load_checkpoint, run_paths

OUT = Path("plots/gradcam")
BEST_MODEL = Path("models/best/best.pt")        # a copy of the best run's best.pt (`artifacts:` in dvc.yaml)
DISPLAY = 128     # images and overlays are upscaled to this many pixels a side so small inputs stay visible
TOP_SHARE = 0.10  # concentration = share of map mass in the top 10% of pixels


def best_run(p: Params, metrics_dir: Path = Path("metrics/study")) -> tuple[str, str, dict[str, float]]:
    """(variant, run) of this study with the best mean val accuracy, then its best seed; plus every
    variant's mean. Files of runs no longer in params.yaml are ignored."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for v in p.study.variants:
        for seed in p.study.seeds:
            f = metrics_dir / f"{v}-{seed}.json"
            m = read_json(f) if f.exists() else {}
            if m.get("val"):
                by_variant[v].append(m)
    if not by_variant:
        raise UserError(f"{metrics_dir}: no evaluated run with scores; run the study first")
    means = {v: statistics.fmean(m["val"]["accuracy"] for m in ms) for v, ms in by_variant.items()}
    variant = max(sorted(means), key=lambda v: means[v])
    run = max(sorted(by_variant[variant], key=lambda m: m["seed"]), key=lambda m: m["val"]["accuracy"])
    return variant, run["run"], means


def cams(model, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] for the given target classes over the last stage's convs."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=gradcam_layers(model)) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])


def map_resolution(model: torch.nn.Module, size: int) -> int:
    """The side of the maps: the last target layer's output at a size x size input (size / 4 in the
    6n+2 net; size / 32 in torchvision's ResNets, whose stem and four stages halve it five times)."""
    seen = {}

    def record(module, inputs, output):           # a hook that returns nothing leaves the output alone
        seen["shape"] = output.shape
    hook = gradcam_layers(model)[-1].register_forward_hook(record)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        hook.remove()
    return int(seen["shape"][-1])


def map_stats(cam: np.ndarray) -> dict[str, float | None]:
    """Where a map's mass lies: top-10% share, central-quarter share, centre of mass (row, col in [0, 1]).
    None everywhere for an empty map (Grad-CAM found no positive evidence)."""
    total = float(cam.sum())
    if total <= 0:
        return {"top10_mass": None, "centre_mass": None, "centroid_row": None, "centroid_col": None}
    h, w = cam.shape
    flat = np.sort(cam.ravel())[::-1]
    top = flat[:max(1, int(round(TOP_SHARE * flat.size)))].sum() / total
    centre = cam[h // 4:h - h // 4, w // 4:w - w // 4].sum() / total
    rows, cols = np.mgrid[0:h, 0:w]
    return {"top10_mass": round(float(top), 4), "centre_mass": round(float(centre), 4),
            "centroid_row": round(float((rows * cam).sum() / total / max(h - 1, 1)), 4),
            "centroid_col": round(float((cols * cam).sum() / total / max(w - 1, 1)), 4)}


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two maps (None if either is flat)."""
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return round(float((a * b).sum() / denom), 4) if denom > 0 else None


def upscale(image: np.ndarray, interpolation: str = "cubic") -> np.ndarray:
    import cv2
    flag = {"cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR}[interpolation]
    return cv2.resize(image, (DISPLAY, DISPLAY), interpolation=flag)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map in jet colours laid over a uint8 HWC image, both upscaled to DISPLAY pixels."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    img = upscale(image).astype(np.float32) / 255
    heat = upscale(cam.astype(np.float32), "linear")
    return show_cam_on_image(np.clip(img, 0, 1), np.clip(heat, 0, 1), use_rgb=True)


def caption(item: dict) -> str:
    text = f"{item['kind']}: predicted {item['predicted']} (p = {item['confidence']:.2f}"
    if item["kind"] == "wrong":
        text += f"; true class {item['true_class_probability']:.2f}"
    return text + ")"


def class_figure(path: Path, title: str, examples: list[tuple[dict, np.ndarray, np.ndarray]], per_kind: int):
    """One row per pair of examples (correct left, wrong right), each as image | heatmap + colour bar |
    overlay, with its untruncated caption above. Saved 1,100 px wide (the report's width), so the
    9-12 pt texts show at 12-17 px."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind = {k: [e for e in examples if e[0]["kind"] == k] for k in ("correct", "wrong")}
    rows = max(1, max(len(v) for v in by_kind.values()))
    fig = plt.figure(figsize=(11, 2.3 * rows + 0.5))
    head, body = fig.subfigures(2, 1, height_ratios=[0.5, 2.3 * rows])
    head.suptitle(title, fontsize=12, y=0.7)
    grid = body.subfigures(rows, 2, squeeze=False, wspace=0.04)
    for col, kind in enumerate(("correct", "wrong")):
        for r in range(rows):
            sub = grid[r][col]
            axes = sub.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.2, 1]})
            for ax in axes:
                ax.axis("off")
            if r >= len(by_kind[kind]):
                if r == len(by_kind[kind]):
                    axes[1].text(0.5, 0.5, f"only {len(by_kind[kind])} {kind} in this split ({per_kind} asked)",
                                 ha="center", va="center", fontsize=11, transform=axes[1].transAxes)
                continue
            item, image, cam = by_kind[kind][r]
            axes[0].imshow(upscale(image))
            axes[0].set_title("image", fontsize=9)
            im = axes[1].imshow(cam, cmap="jet", vmin=0, vmax=1, interpolation="nearest")
            axes[1].set_title("Grad-CAM (true class)", fontsize=9)
            bar = sub.colorbar(im, ax=axes[1], fraction=0.046, pad=0.03, ticks=[0, 0.5, 1])
            bar.ax.tick_params(labelsize=9)
            axes[2].imshow(overlay(image, cam))
            axes[2].set_title("overlay", fontsize=9)
            sub.suptitle(caption(item), fontsize=10, color="#1a6b1a" if kind == "correct" else "#a01010")
    save_figure(fig, path, dpi=100)


def examples_for(pred: np.ndarray, y: np.ndarray, c: int, k: int) -> dict[str, list[int]]:
    rows = np.flatnonzero(y == c)
    return {"correct": [int(i) for i in rows if pred[i] == c][:k], "wrong": [int(i) for i in rows if pred[i] != c][:k]}


def gradcam(p: Params) -> dict:
    from PIL import Image

    variant, run, means = best_run(p)
    v = p.variant(variant)
    paths = run_paths(variant, int(run.rsplit("-", 1)[1]))
    if not paths.best.exists():
        raise UserError(f"{paths.best}: no checkpoint for the best run {run}; run `dvc repro` to train it")
    best = load_checkpoint(paths.best)
    with atomic_path(BEST_MODEL) as tmp:             # the study's best model, as a DVC artifact
        shutil.copyfile(paths.best, tmp)
    classes = load_classes()
    unknown = [c for c in p.gradcam.classes if c not in classes]
    if unknown:
        raise UserError(f"gradcam.classes: {', '.join(map(repr, unknown))} not in the prepared data set; "
                        f"known: {', '.join(classes)}")
    model, device = scoring_model(best, v.train)     # on the run's device: a GPU scores 7,500 images in seconds
    split = load_split(p.gradcam.split)
    _, pred, prob = predict_as_validated(model, device, split, best, v)
    k = p.gradcam.per_kind
    index = {"variant": variant, "run": run, "mean_val_accuracy": round(means[variant], 6),
             "split": p.gradcam.split, "image_size": int(split.x.shape[1]),
             "map_resolution": map_resolution(model, int(split.x.shape[1])),
             "target_layers": [n for n, m in model.named_modules() if any(m is t for t in gradcam_layers(model))],
             "classes": {}}
    if index["map_resolution"] < 4:
        console.print(f"[yellow]warning:[/yellow] the Grad-CAM maps are {index['map_resolution']}x"
                      f"{index['map_resolution']} at {index['image_size']} px input: too coarse to show where the "
                      "evidence lies; raise data.image_size")
    with atomic_dir(OUT) as tmp:
        for name in p.gradcam.classes:
            c = classes.index(name)
            chosen = examples_for(pred, split.y, c, k)
            items, shown = [], []
            for kind, idx in chosen.items():
                if not idx:
                    continue
                x = to_tensor(split.x[idx], best["mean"], best["std"], device)    # maps in fp32
                maps = cams(model, x, [c] * len(idx))
                wrong_maps = cams(model, x, [int(pred[i]) for i in idx]) if kind == "wrong" else None
                for j, i in enumerate(idx):
                    image = np.asarray(split.x[i])
                    rel = Path("overlays") / name / f"{kind}_{j}.png"
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(overlay(image, maps[j])).save(tmp / rel)
                    item = {"kind": kind, "index": i, "true": name, "predicted": classes[pred[i]],
                            "confidence": round(float(prob[i, pred[i]]), 4),
                            "true_class_probability": round(float(prob[i, c]), 4),
                            "overlay": str(rel), "map_shape": list(maps[j].shape), **map_stats(maps[j])}
                    if wrong_maps is not None:
                        item["predicted_map"] = {k2: v2 for k2, v2 in map_stats(wrong_maps[j]).items()}
                        item["true_vs_predicted_map_correlation"] = correlation(maps[j], wrong_maps[j])
                    items.append(item)
                    shown.append((item, image, maps[j]))
            counts = {kind: len(idx) for kind, idx in chosen.items()}
            for kind, n_found in counts.items():
                if n_found < k:
                    console.print(f"gradcam: class {name}: only {n_found} {kind} {p.gradcam.split} image(s) of {k}",
                                  markup=False)      # a class is a folder name, which may hold [ ]
            class_figure(tmp / "grids" / f"{name}.png", f"{name}: Grad-CAM of the true class ({run}, {p.gradcam.split} split)",
                         shown, k)
            index["classes"][name] = {"available": {"images": int((split.y == c).sum()), **counts},
                                      "examples": items}
        write_json(tmp / "index.json", index)
    console.print(f"gradcam: best variant {variant} (mean val accuracy {means[variant]:.3f}), run {run}; "
                  f"{len(p.gradcam.classes)} class figures from the {p.gradcam.split} split in {OUT}/")
    return index


# --------------------------------------------------------------------------- analysis

def _mean(values) -> float | None:
    values = [x for x in values if x is not None]
    return statistics.fmean(values) if values else None


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


MAP_MEASURES = (("top10_mass", "top-10% mass (concentration)", 0.10), ("centre_mass", "central-quarter mass", 0.25))


def pooled_examples(index: dict) -> dict[str, list[dict]]:
    """Every class's examples, by kind ("correct", "wrong")."""
    pooled = defaultdict(list)
    for entry in index["classes"].values():
        for e in entry["examples"]:
            pooled[e["kind"]].append(e)
    return pooled


def map_tests(index: dict) -> dict[str, tuple[list[float], list[float], Comparison]]:
    """Per map measure (MAP_MEASURES), the correct and the wrong examples' values pooled over
    classes, and Welch's t of correct minus wrong (only where each side has 2 values or more)."""
    pooled = pooled_examples(index)
    out = {}
    for key, _, _ in MAP_MEASURES:
        c = [e[key] for e in pooled["correct"] if e[key] is not None]
        w = [e[key] for e in pooled["wrong"] if e[key] is not None]
        if len(c) >= 2 and len(w) >= 2:
            out[key] = (c, w, welch(c, w))
    return out


def analysis(index: dict) -> tuple[dict[str, str], list[str]]:
    """Observations computed from the maps' numbers: one paragraph per class, and overall sentences."""
    per_class, pooled = {}, pooled_examples(index)
    for name, entry in index["classes"].items():
        ex = entry["examples"]
        kinds = {kd: [e for e in ex if e["kind"] == kd] for kd in ("correct", "wrong")}
        parts = [f"{len(kinds['correct'])} correct and {len(kinds['wrong'])} wrong of "
                 f"{entry['available']['images']} {index['split']} images."]
        for kd, es in kinds.items():
            if es:
                parts.append(f"{kd.capitalize()}: top-10% mass {_f(_mean(e['top10_mass'] for e in es))}, "
                             f"central-quarter mass {_f(_mean(e['centre_mass'] for e in es))}.")
        if kinds["wrong"]:
            taken = Counter(e["predicted"] for e in kinds["wrong"])
            parts.append("Wrong ones were taken for " + ", ".join(f"{c} ({n})" for c, n in taken.most_common())
                         + f" with mean confidence {statistics.fmean(e['confidence'] for e in kinds['wrong']):.2f}.")
            r = _mean(e.get("true_vs_predicted_map_correlation") for e in kinds["wrong"])
            if r is not None:
                parts.append(f"Their true-class and predicted-class maps correlate at r = {r:.2f} on average: "
                             + ("the evidence for both classes sits in the same region, so the model looked at "
                                "the right place and read it as the other class." if r >= 0.5 else
                                "the two classes draw on different regions of the image." if r <= 0 else
                                "the regions overlap only in part."))
        per_class[name] = " ".join(parts)

    overall = []
    res = index["map_resolution"]
    overall.append(f"The maps come from the last stage, which sees the {index['image_size']}x{index['image_size']} input "
                   f"at {res}x{res}: each map is {res}x{res} evidence upsampled to the image, so it can place "
                   f"evidence only to within {index['image_size'] // res} pixels.")
    meaning = {"top10_mass": ("Correct answers' maps are more concentrated than wrong ones'.",
                              "Wrong answers' maps are more concentrated than correct ones': they fix on a small patch."),
               "centre_mass": ("Correct answers draw more of their evidence from the centre of the image; wrong "
                               "ones look more towards the edges.",
                               "Wrong answers draw more of their evidence from the centre than correct ones.")}
    tests = map_tests(index)
    for key, label, flat in MAP_MEASURES:
        if key in tests:
            c, w, cmp = tests[key]
            overall.append(f"{label.capitalize()}: correct {statistics.fmean(c):.3f} (n = {len(c)}), wrong "
                           f"{statistics.fmean(w):.3f} (n = {len(w)}), a flat map gives {flat:.2f}; correct minus "
                           f"wrong = {cmp.describe()}."
                           + (" " + meaning[key][0 if cmp.diff > 0 else 1] if cmp.significant else ""))
    rs = [e["true_vs_predicted_map_correlation"] for e in pooled["wrong"]
          if e.get("true_vs_predicted_map_correlation") is not None]
    if rs:
        same = sum(r >= 0.5 for r in rs)
        apart = sum(r <= 0 for r in rs)
        overall.append(f"Where wrong answers look: for the {len(rs)} wrong examples, the map of the class the model "
                       f"chose correlates with the map of the true class at mean r = {statistics.fmean(rs):.2f}. In "
                       f"{same} of them (r >= 0.5) both classes draw on the same region: the model looked at the "
                       f"right place and read it as the other class. In {apart} (r <= 0) they draw on different "
                       "regions, so the chosen class came from other parts of the image.")
    empty = sum(e["top10_mass"] is None for es in pooled.values() for e in es)
    if empty:
        overall.append(f"{empty} map(s) were empty: no positive evidence for the true class anywhere.")
    return per_class, overall


def main(argv: list[str]) -> None:
    no_options(argv, "gradcam", __doc__, "gradcam.*")
    gradcam(load_params())


if __name__ == "__main__":
    run_cli(main)
