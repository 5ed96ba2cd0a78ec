"""A stand-in for the 25 Indian bird species: class-folder JPEGs of varied sizes in train/ and valid/.

  python bench/make_birds_like.py OUT [--classes 25] [--train 160] [--valid 40] [--seed 0]

The real set (30,000 train / 7,500 valid photos of different resolutions) cannot be
downloaded here, so the end-to-end check (bench/gpu_e2e.sh) runs on this: the same layout,
the seven Grad-CAM classes of the assignment among the class names, and JPEGs of 180 to
640 pixels a side, so `prepare` decodes, orients and resizes as it would on the real set.
Each class is a colour and a blob position plus noise, so the models learn something.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from resnorm.assignment import BIRDS  # noqa: E402


def class_names(n: int) -> list[str]:
    names = list(BIRDS) + [f"Other Bird {i:02d}" for i in range(n)]
    return names[:n]


PATCHES = 12      # soft grey patches of a scene: enough that dHash's 9x8 thumbnail differs image to image


def image(rng: np.random.Generator, label: int, classes: int) -> Image.Image:
    """A blob of the class's colour near the class's place, on a random scene: a tilted brightness
    gradient and PATCHES soft grey patches, plus noise. The scene varies as photos' backgrounds do,
    so distinct images get distinct dHashes; on plain noise, as this stand-in once was, a class's
    hashes chained into near-duplicate groups of up to 1,467 of its 1,500 images."""
    w, h = (int(v) for v in rng.integers(180, 641, 2))
    hue = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 151 + 30) % 256], np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    y, x = yy / h, xx / w
    angle = rng.uniform(0, 2 * np.pi)
    scene = 110 + 60 * ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle))
    for _ in range(PATCHES):
        (py, px), r = rng.uniform(0, 1, 2), rng.uniform(0.05, 0.25)
        scene = scene + rng.uniform(-70, 70) * np.exp(-(((y - py) / r) ** 2 + ((x - px) / r) ** 2))
    a = scene[..., None] + rng.normal(0, 30, (h, w, 3))
    cy = 0.25 + 0.5 * ((label * 7) % classes) / classes + rng.uniform(-0.06, 0.06)
    cx = 0.25 + 0.5 * ((label * 11) % classes) / classes + rng.uniform(-0.06, 0.06)
    blob = np.exp(-(((y - cy) / 0.18) ** 2 + ((x - cx) / 0.18) ** 2))[..., None]
    a = a * (1 - blob) + hue * blob
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--classes", type=int, default=25)
    ap.add_argument("--train", type=int, default=160, help="images per class in train/")
    ap.add_argument("--valid", type=int, default=40, help="images per class in valid/")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    names = class_names(args.classes)
    for split, count in (("train", args.train), ("valid", args.valid)):
        for label, name in enumerate(names):
            folder = args.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image(rng, label, args.classes).save(folder / f"{i:05d}.jpg", quality=88)
    print(f"{args.out}: {args.classes} classes, {args.train * args.classes} train / "
          f"{args.valid * args.classes} valid JPEGs")


if __name__ == "__main__":
    main()
