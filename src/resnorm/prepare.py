"""Stage `prepare`: class folders of images of any kind -> memory-mappable uint8 arrays.

Every file is decoded once with Pillow (EXIF orientation applied, any mode made
RGB), resized to `data.image_size` squared, and hashed twice: sha1 of the bytes
(exact duplicates are dropped) and a 64-bit dHash of the pixels (near-duplicates
are kept together in one split). The split is stratified per class and fixed by
`data.seed`. Unusable files are skipped and listed with their reason; nothing
here stops on one bad file.

Outputs (under `data/prepared/`, replaced whole, never half-written):
  {train,val,test}_x.npy  uint8 (N, S, S, 3)   {train,val,test}_y.npy  int64 (N,)
  classes.json  manifest.csv  report.json
"""
from __future__ import annotations

import hashlib
import os
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .io import UserError, atomic_dir, console, run_cli, write_csv, write_json
from .params import DataParams, load_params

SPLITS = ("train", "val", "test")
SPLIT_FOLDERS = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MIN_SIDE = 8        # smaller images carry no usable content at any image_size
OUT = Path("data/prepared")


@dataclass
class Item:
    path: str
    label: str
    given_split: str | None         # from train/valid/test folders, else None
    sha1: str = ""
    dhash: int = 0
    size: tuple[int, int] = (0, 0)
    mode: str = ""
    row: int = -1                   # row in the scan buffer
    split: str = ""


# --------------------------------------------------------------------------- scanning

def _class_folders(root: Path) -> list[tuple[str, Path]]:
    return sorted((d.name, d) for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    """All files below `folder`; directory symlinks are not followed, so loops cannot hang the scan."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return out


def discover(root: Path) -> tuple[list[Item], list[dict], bool]:
    """Find (file, class, given split); returns items, skipped entries and whether splits were given."""
    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a folder (expected root/<class>/*.jpg "
                        f"or root/train/<class>/..., root/valid/<class>/...)")
    top = _class_folders(root)
    given = {SPLIT_FOLDERS[name.lower()]: d for name, d in top if name.lower() in SPLIT_FOLDERS}
    has_splits = "train" in given
    items, skipped = [], []
    sources = [(s, d) for s, d in sorted(given.items(), key=lambda kv: SPLITS.index(kv[0]))] if has_splits \
        else [(None, root)]
    for split, base in sources:
        for label, folder in _class_folders(base):
            files = _files(folder)
            if not files:
                skipped.append({"path": str(folder), "reason": "empty class folder"})
            for f in files:
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append({"path": str(f), "reason": f"not an image file name ({f.suffix or 'no suffix'})"})
                else:
                    items.append(Item(str(f), label, split))
    return items, skipped, has_splits


def dhash(gray: Image.Image) -> int:
    """64-bit difference hash: robust to re-encoding and small resizes, for near-duplicate grouping."""
    a = np.asarray(gray.resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: 16-bit and float greys are rescaled, alpha is laid on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255
        img = Image.fromarray(a.round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def load_image(path: str, size: int, max_pixels: int) -> tuple[np.ndarray, str, int, tuple[int, int], str]:
    """Decode, orient, convert and resize one file; raises ValueError/OSError with a short reason."""
    data = Path(path).read_bytes()
    if not data:
        raise ValueError("zero-byte file")
    sha1 = hashlib.sha1(data).hexdigest()
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        from io import BytesIO
        with Image.open(BytesIO(data)) as img:
            w, h = img.size
            mode = img.mode
            if w * h > max_pixels:
                raise ValueError(f"image too large ({w}x{h} > data.max_image_pixels {max_pixels})")
            if min(w, h) < MIN_SIDE:
                raise ValueError(f"image too small ({w}x{h}, under {MIN_SIDE} pixels a side)")
            if img.format == "JPEG":
                img.draft("RGB", (size * 2, size * 2))    # DCT-domain downscale: much faster decode
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
    h64 = dhash(rgb.convert("L"))
    out = rgb.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8), sha1, h64, (w, h), mode


def _load_worker(args: tuple[str, int, int]):
    path, size, max_pixels = args
    try:
        return load_image(path, size, max_pixels)
    except Image.DecompressionBombError as e:
        return f"decompression bomb refused ({str(e).split('.')[0]})"
    except Image.DecompressionBombWarning:
        return "decompression bomb refused (over data.max_image_pixels)"
    except Image.UnidentifiedImageError:
        return "not a readable image"
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"cannot decode: {msg}" if not isinstance(e, ValueError) else msg


def decode_all(items: list[Item], d: DataParams, buffer: np.ndarray, skipped: list[dict]) -> list[Item]:
    """Decode every item into `buffer` rows (in parallel when there are many); returns the good ones."""
    from rich.progress import Progress

    jobs = [(it.path, d.image_size, d.max_image_pixels) for it in items]
    workers = min(os.cpu_count() or 1, 8)
    good = []
    with Progress(console=console, transient=True, disable=len(items) < 200) as bar:
        task = bar.add_task("decoding images", total=len(items))
        if workers > 1 and len(items) >= 200:
            with Pool(workers) as pool:
                results = pool.imap(_load_worker, jobs, chunksize=32)
                good = _collect(items, results, buffer, skipped, bar, task)
        else:
            good = _collect(items, map(_load_worker, jobs), buffer, skipped, bar, task)
    return good


def _collect(items, results, buffer, skipped, bar, task) -> list[Item]:
    good = []
    for it, res in zip(items, results):
        bar.advance(task)
        if isinstance(res, str):
            skipped.append({"path": it.path, "reason": res})
            continue
        arr, it.sha1, it.dhash, it.size, it.mode = res
        it.row = len(good)
        buffer[it.row] = arr
        good.append(it)
    return good


# --------------------------------------------------------------------------- duplicates

def drop_exact_duplicates(items: list[Item], skipped: list[dict]) -> list[Item]:
    """One copy per content hash; a hash found under two labels is ambiguous and dropped entirely."""
    by_hash: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_hash[it.sha1].append(it)
    keep = []
    for group in by_hash.values():
        labels = sorted({it.label for it in group})
        if len(labels) > 1:
            for it in group:
                skipped.append({"path": it.path, "reason": f"same content labelled {', '.join(labels)}"})
            continue
        order = sorted(group, key=lambda it: (SPLITS.index(it.given_split or "train"), it.path))
        keep.append(order[0])
        for it in order[1:]:
            skipped.append({"path": it.path, "reason": f"exact duplicate of {order[0].path}"})
    return sorted(keep, key=lambda it: it.row)


def near_duplicate_groups(items: list[Item], max_bits: int) -> list[int]:
    """Group id per item: dHashes within `max_bits` are linked (bands make it near-linear)."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bands = max_bits + 1                 # pigeonhole: within max_bits, one band matches exactly
    width = 64 // bands if bands <= 64 else 1
    for b in range(min(bands, 64)):
        shift, mask = b * width, (1 << width) - 1 if b < bands - 1 else (1 << (64 - b * width)) - 1
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            buckets[(it.dhash >> shift) & mask].append(i)
        for members in buckets.values():
            for a in range(len(members)):
                for c in range(a + 1, len(members)):
                    i, j = members[a], members[c]
                    if items[i].label == items[j].label and \
                            bin(items[i].dhash ^ items[j].dhash).count("1") <= max_bits:
                        parent[find(i)] = find(j)
    return [find(i) for i in range(len(items))]


# --------------------------------------------------------------------------- splitting

def assign_splits(items: list[Item], fractions: dict[str, float], seed: int, groups: list[int]) -> None:
    """Stratified, group-aware split: whole near-duplicate groups go to one split, per class."""
    rng = random.Random(seed)
    wanted = [s for s in SPLITS if fractions[s] > 0]
    per_class: dict[str, dict[int, list[Item]]] = defaultdict(lambda: defaultdict(list))
    for it, g in zip(items, groups):
        per_class[it.label][g].append(it)
    for label in sorted(per_class):
        glist = sorted(per_class[label].values(), key=lambda g: min(it.path for it in g))
        rng.shuffle(glist)
        total = sum(len(g) for g in glist)
        count = {s: 0 for s in wanted}
        # smallest splits first, so each gets at least one group, then fill by largest deficit
        for i, group in enumerate(glist):
            if i < len(wanted):
                target = sorted(wanted, key=lambda s: (fractions[s], SPLITS.index(s)))[i]
            else:
                target = max(wanted, key=lambda s: (fractions[s] * total - count[s], -SPLITS.index(s)))
            for it in group:
                it.split = target
            count[target] += len(group)


def split_items(items: list[Item], d: DataParams, has_splits: bool, skipped: list[dict]) -> tuple[list[Item], list[str]]:
    """Decide each item's split; drops classes too small to split. Returns items and dropped classes."""
    groups = near_duplicate_groups(items, d.near_duplicate_bits)
    fr = {"train": d.split.train, "val": d.split.val, "test": d.split.test}
    need = sum(1 for v in fr.values() if v > 0)
    if has_splits:
        have_test = any(it.given_split == "test" for it in items)
        for it in items:
            it.split = it.given_split
        if not have_test and fr["test"] > 0:     # carve test out of train, group-aware
            pool = [(it, g) for it, g in zip(items, groups) if it.given_split == "train"]
            sub = {"train": fr["train"] / (fr["train"] + fr["test"]), "val": 0.0,
                   "test": fr["test"] / (fr["train"] + fr["test"])}
            assign_splits([it for it, _ in pool], sub, d.seed, [g for _, g in pool])
    counts: dict[str, int] = defaultdict(int)
    distinct: dict[str, set] = defaultdict(set)
    for it, g in zip(items, groups):
        counts[it.label] += 1
        distinct[it.label].add(g)
    dropped = sorted(lbl for lbl in counts
                     if counts[lbl] < d.min_images_per_class or len(distinct[lbl]) < need)
    for lbl in dropped:
        console.print(f"[yellow]warning:[/yellow] class {lbl!r} dropped: {counts[lbl]} usable images "
                      f"({len(distinct[lbl])} distinct), data.min_images_per_class is {d.min_images_per_class}")
    keep = [(it, g) for it, g in zip(items, groups) if it.label not in dropped]
    if not has_splits:
        assign_splits([it for it, _ in keep], fr, d.seed, [g for _, g in keep])
    kept = [it for it, _ in keep]
    if has_splits:
        missing = sorted({it.label for it in kept} - {it.label for it in kept if it.split == "train"})
        for lbl in missing:
            console.print(f"[yellow]warning:[/yellow] class {lbl!r} dropped: no training images")
        dropped += missing
        kept = [it for it in kept if it.label not in missing]
    for it in items:
        if it.label in dropped:
            skipped.append({"path": it.path, "reason": f"class {it.label} dropped (too few images)"})
    return kept, sorted(dropped)


# --------------------------------------------------------------------------- main

def prepare(d: DataParams, out: Path = OUT) -> dict:
    root = Path(d.root)
    items, skipped, has_splits = discover(root)
    if not items:
        raise UserError(f"data.root: {root} holds no image files in class folders")
    with atomic_dir(out) as tmp:
        buffer = np.lib.format.open_memmap(tmp / "scan.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(items), d.image_size, d.image_size, 3))
        items = decode_all(items, d, buffer, skipped)
        items = drop_exact_duplicates(items, skipped)
        items, dropped = split_items(items, d, has_splits, skipped)
        classes = sorted({it.label for it in items})
        if len(classes) < 2:
            raise UserError(f"data.root: {root}: {len(classes)} usable class(es) left after skipping bad files "
                            f"and classes under data.min_images_per_class={d.min_images_per_class}; need at least 2")
        index = {c: i for i, c in enumerate(classes)}
        for split in SPLITS:
            rows = sorted((it for it in items if it.split == split), key=lambda it: (it.label, it.path))
            x = np.lib.format.open_memmap(tmp / f"{split}_x.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(rows), d.image_size, d.image_size, 3))
            for i, it in enumerate(rows):
                x[i] = buffer[it.row]
            x.flush()
            del x
            np.save(tmp / f"{split}_y.npy", np.array([index[it.label] for it in rows], dtype=np.int64))
        del buffer
        (tmp / "scan.npy").unlink()
        manifest = [{"path": it.path, "sha1": it.sha1, "class": it.label, "split": it.split,
                     "width": it.size[0], "height": it.size[1], "mode": it.mode}
                    for it in sorted(items, key=lambda it: (SPLITS.index(it.split), it.label, it.path))]
        write_csv(tmp / "manifest.csv", manifest)
        write_json(tmp / "classes.json", classes)
        counts = {c: {s: sum(1 for it in items if it.label == c and it.split == s) for s in SPLITS}
                  for c in classes}
        report = {
            "root": str(root), "layout": "given splits" if has_splits else "class folders",
            "image_size": d.image_size, "seed": d.seed, "classes": len(classes),
            "images": {s: sum(v[s] for v in counts.values()) for s in SPLITS},
            "per_class": counts, "dropped_classes": dropped,
            "skipped": sorted(skipped, key=lambda r: r["path"]),
        }
        write_json(tmp / "report.json", report)
    return report


def main(argv: list[str]) -> None:
    p = load_params()
    report = prepare(p.data)
    from rich.table import Table

    table = Table(title=f"prepared {report['root']} at {report['image_size']}px")
    for col in ("class", *SPLITS):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c, v in report["per_class"].items():
        table.add_row(c, *(str(v[s]) for s in SPLITS))
    table.add_row("total", *(str(report["images"][s]) for s in SPLITS))
    console.print(table)
    if report["skipped"]:
        console.print(f"skipped {len(report['skipped'])} file(s):")
        for r in report["skipped"][:20]:
            console.print(f"  {r['path']}: {r['reason']}", soft_wrap=True)
        if len(report["skipped"]) > 20:
            console.print(f"  ... and {len(report['skipped']) - 20} more in {OUT}/report.json")


if __name__ == "__main__":
    run_cli(main)
