"""Classify images with a trained checkpoint, outside the pipeline.

  python -m resnorm.predict models/experiment/best.pt photo.jpg
  python -m resnorm.predict models/best/best.pt some/folder --top-k 5 --json preds.json

A checkpoint carries all it needs: the model's arguments and the image size it was trained
at (`model_config`), the class names, and the normalization mean and std. Each image goes
through what `prepare` does to the training images (decode, EXIF orientation, RGB, resize
to the training size), so any image size works. A folder is read in sorted order, with a
progress bar when it is large. In Python:

    from resnorm.predict import load_model, classify
    model, info = load_model("models/experiment/best.pt")
    classify(model, info, ["photo.jpg"])   # [(path, [(class, probability), ...]), ...]
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from .data import to_tensor
from .io import UserError, atomic_path, console, run_cli
from .model import model_from_config
from .prepare import IMAGE_SUFFIXES, decode_failure, load_image

MAX_PIXELS = 178_956_970           # Pillow's own decompression-bomb limit


def load_model(checkpoint: str | Path) -> tuple[torch.nn.Module, dict]:
    """The model of a `best.pt` / `last.pt` in eval mode, and what it needs: classes, size, mean, std."""
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    missing = [k for k in ("model", "model_config", "classes", "mean", "std") if k not in (ck or {})]
    if missing:
        raise UserError(f"{path}: not a resnorm checkpoint with a model (missing {', '.join(missing)})")
    size = ck["model_config"]["image_size"]
    model = model_from_config(ck["model_config"])
    model.load_state_dict(ck["model"])
    model.eval()
    return model, {"classes": list(ck["classes"]), "image_size": size, "mean": ck["mean"], "std": ck["std"],
                   "name": ck.get("name", path.parent.name), "epoch": ck.get("epoch")}


def image_files(target: str | Path) -> list[Path]:
    p = Path(target)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{p}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    raise UserError(f"{p}: no such file or folder")


@torch.no_grad()
def classify(model: torch.nn.Module, info: dict, files: list[Path], top_k: int = 3,
             batch_size: int = 32, progress: bool = False) -> list[tuple[str, list[tuple[str, float]] | str]]:
    """(path, top-k (class, probability) pairs) per file, or (path, reason) for a file that cannot be read."""
    from rich.progress import Progress

    size, k = info["image_size"], min(top_k, len(info["classes"]))
    out: list = []
    with (Progress(console=console, transient=True) if progress else contextlib.nullcontext()) as bar:
        task = bar.add_task("classifying", total=len(files)) if bar else None
        for start in range(0, len(files), batch_size):
            chunk, arrays = files[start:start + batch_size], []
            ok = []
            for f in chunk:
                try:
                    arrays.append(load_image(str(f), size, MAX_PIXELS)[0])
                    ok.append(f)
                except Exception as e:          # one bad file is reported, the rest go on
                    out.append((str(f), f"cannot read: {decode_failure(e)}"))
            if arrays:
                x = to_tensor(np.stack(arrays), info["mean"], info["std"])
                prob = torch.softmax(model(x).float(), 1)
                top = prob.topk(k, 1)
                for f, p, i in zip(ok, top.values.tolist(), top.indices.tolist()):
                    out.append((str(f), [(info["classes"][j], round(q, 4)) for j, q in zip(i, p)]))
            if bar:
                bar.advance(task, len(chunk))
    order = {str(f): n for n, f in enumerate(files)}
    return sorted(out, key=lambda r: order[r[0]])


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m resnorm.predict", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a best.pt or last.pt written by resnorm.train")
    ap.add_argument("images", help="an image file or a folder of them")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--json", help="also write the predictions to this JSON file")
    args = ap.parse_args(argv)
    if args.top_k < 1:
        raise UserError(f"--top-k = {args.top_k} is not allowed: at least 1")
    model, info = load_model(args.checkpoint)
    files = image_files(args.images)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    results = classify(model, info, files, args.top_k, progress=len(files) > 50)
    if all(isinstance(top, str) for _, top in results):
        path, why = results[0]
        raise UserError(f"{path}: {why}" if len(results) == 1 else
                        f"{args.images}: none of its {len(results)} image files could be read ({path}: {why})")
    console.print(f"{info['name']} (epoch {info['epoch']}, {len(info['classes'])} classes, "
                  f"{info['image_size']} px): {len(files)} image(s)", markup=False)
    for path, top in results:
        shown = top if isinstance(top, str) else "  ".join(f"{c} {p:.3f}" for c, p in top)
        print(f"{path}\t{shown}")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps([{"path": p, "top": t if isinstance(t, str) else
                                        [{"class": c, "probability": q} for c, q in t]} for p, t in results],
                                      indent=1))


if __name__ == "__main__":
    run_cli(main)
