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
  arrays.json             each array file's sha1, and the train split's per-channel mean and std
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import random
import re
import shutil
import stat
import warnings
from collections import defaultdict
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .io import UserError, atomic_dir, console, no_options, run_cli, write_csv, write_json
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

def shown(path: str | Path) -> str:
    """A path as text that any file can take: bytes that are not UTF-8 (kept by Python as
    surrogates) are written as \\xNN escapes, so the manifest and report never fail to encode."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, links resolved, lies under `root` (resolved)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):          # a link loop
        return False


def _class_folders(root: Path, d: DataParams, skipped: list[dict], real_root: Path) -> list[tuple[str, Path]]:
    """Sub-folders of `root`, sorted; a linked folder that leaves data.root (`real_root`, resolved)
    is skipped and listed unless data.follow_links."""
    out = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if entry.is_symlink() and not d.follow_links and not _inside(entry, real_root):
            skipped.append({"path": shown(entry), "reason": "link leaving data.root (data.follow_links is false)"})
            continue
        out.append((shown(entry.name), entry))        # the class name: any bytes, as text
    return out


def _files(folder: Path) -> list[Path]:
    """All files below `folder`; directory symlinks are not followed, so loops cannot hang the scan."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return out


def unreadable(f: Path, d: DataParams, root: Path) -> str | None:
    """Why `f` is not read at all, or None: a link out of data.root, anything but a regular file
    (a FIFO would block forever, a device read without end), or a file over data.max_file_bytes."""
    try:
        if f.is_symlink() and not d.follow_links and not _inside(f, root):
            return "link leaving data.root (data.follow_links is false)"
        st = f.stat()
    except OSError as e:
        return f"cannot read: {e.strerror or type(e).__name__}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size > d.max_file_bytes:
        return f"file too large ({st.st_size} bytes > data.max_file_bytes {d.max_file_bytes})"
    return None


def split_layout(top: list[tuple[str, Path]]) -> dict[str, Path] | None:
    """The split folders when the layout is root/<split>/<class>/...: every top-level folder is a
    split name (train, valid/val/validation, test), there is a train folder, and each holds
    folders, not images. A class that happens to be called `test` does not make a split layout."""
    names = {name.lower() for name, _ in top}
    if not top or "train" not in names or not names <= SPLIT_FOLDERS.keys():
        return None
    for _, folder in top:
        if any(f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir()):
            return None
    return {SPLIT_FOLDERS[name.lower()]: d for name, d in top}


def discover(root: Path, d: DataParams | None = None) -> tuple[list[Item], list[dict], bool]:
    """Find (file, class, given split); returns items, skipped entries and whether splits were given."""
    d = d or DataParams(root=str(root))
    if not root.is_dir():
        raise UserError(f"data.root: {shown(root)} is not a folder (expected root/<class>/*.jpg "
                        f"or root/train/<class>/..., root/valid/<class>/...)")
    items, skipped = [], []
    real_root = root.resolve()
    top = _class_folders(root, d, skipped, real_root)
    given = split_layout(top)
    has_splits = given is not None
    sources = [(s, g) for s, g in sorted(given.items(), key=lambda kv: SPLITS.index(kv[0]))] if has_splits \
        else [(None, root)]
    for split, base in sources:
        for label, folder in (_class_folders(base, d, skipped, real_root) if has_splits else top):
            files = _files(folder)
            if not files:
                skipped.append({"path": shown(folder), "reason": "empty class folder"})
            for f in files:
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append({"path": shown(f), "reason": f"not an image file name ({f.suffix or 'no suffix'})"})
                elif (why := unreadable(f, d, real_root)) is not None:
                    skipped.append({"path": shown(f), "reason": why})
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


def load_image(path: str, size: int, max_pixels: int,
               max_bytes: int = DataParams.max_file_bytes) -> tuple[np.ndarray, str, int, tuple[int, int], str]:
    """Decode, orient, convert and resize one file; raises ValueError/OSError with a short reason."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)                # bounded even if the file grew after the scan
    if not data:
        raise ValueError("zero-byte file")
    if len(data) > max_bytes:
        raise ValueError(f"file too large (over data.max_file_bytes {max_bytes})")
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


def _load_worker(args: tuple[str, int, int, int]):
    """load_image, or the reason the file is skipped: no file stops the run."""
    path, size, max_pixels, max_bytes = args
    try:
        return load_image(path, size, max_pixels, max_bytes)
    except Exception as e:
        return decode_failure(e)


def decode_failure(e: Exception) -> str:
    """A short reason for what `load_image` raised on one file (resnorm.predict says the same)."""
    msg = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, Image.DecompressionBombError):
        return f"decompression bomb refused ({msg.split('.')[0]})"
    if isinstance(e, Image.DecompressionBombWarning):
        return "decompression bomb refused (over data.max_image_pixels)"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not a readable image"
    if isinstance(e, ValueError):       # load_image's own reasons: zero-byte file, too large, too small
        return msg or type(e).__name__
    if isinstance(e, (OSError, SyntaxError, EOFError)):
        return f"cannot decode: {msg or type(e).__name__}"
    # Pillow's plugins raise more than they document (struct.error in EXIF, ...)
    return f"cannot decode: {type(e).__name__}" + (f": {msg[:200]}" if msg else "")


def decode_all(items: list[Item], d: DataParams, buffer: np.ndarray, skipped: list[dict]) -> list[Item]:
    """Decode every item into `buffer` rows (in parallel when there are many); returns the good ones."""
    from rich.progress import Progress

    jobs = [(it.path, d.image_size, d.max_image_pixels, d.max_file_bytes) for it in items]
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
            skipped.append({"path": shown(it.path), "reason": res})
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
                skipped.append({"path": shown(it.path), "reason": f"same content labelled {', '.join(labels)}"})
            continue
        order = sorted(group, key=lambda it: (SPLITS.index(it.given_split or "train"), it.path))
        keep.append(order[0])
        for it in order[1:]:
            skipped.append({"path": shown(it.path), "reason": f"exact duplicate of {shown(order[0].path)}"})
    return sorted(keep, key=lambda it: it.row)


def _root(parent: list[int], i: int) -> int:
    """Union-find: the root of i's set, halving the path on the way."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


VECTOR_BUCKET = 64     # a bucket with more distinct hashes compares them with numpy, not pair by pair


def near_duplicate_groups(items: list[Item], max_bits: int) -> list[int]:
    """Group id per item: dHashes of one class within `max_bits` are linked.

    Pigeonhole: split the 64 bits into max_bits + 1 bands; two hashes within max_bits agree
    exactly on at least one band, so only hashes sharing a band value (a bucket) are compared.
    Equal hashes (same-colour images, say) are linked first, so a bucket holds distinct
    hashes only, and within a bucket every pair is compared: a small bucket pair by pair, a
    larger one (look-alike photos fill them: 300 or more of a class's 1,200 birds-like images)
    each hash against the rest at once with numpy. Exact, so `near_duplicate_groups_plain`, the
    all-pairs reference, gives the same groups. It used to compare each hash of a bucket over 256
    with its next 256 in sorted order only, which missed pairs: 58 images of the birds-like test
    split had a near-duplicate in train.
    """
    parent = list(range(len(items)))
    find = functools.partial(_root, parent)
    first: dict[tuple[str, int], int] = {}           # (class, hash) -> first item with it
    for i, it in enumerate(items):
        j = first.setdefault((it.label, it.dhash), i)
        if j != i:
            parent[find(i)] = find(j)
    keys = sorted(first)                              # distinct (class, hash), sorted
    bands = max_bits + 1
    width = 64 // bands if bands <= 64 else 1
    for b in range(min(bands, 64)):
        shift, mask = b * width, (1 << width) - 1 if b < bands - 1 else (1 << (64 - b * width)) - 1
        buckets: dict[tuple[str, int], list[int]] = defaultdict(list)
        for label, h in keys:
            buckets[(label, (h >> shift) & mask)].append(h)
        for (label, _), hashes in buckets.items():
            if len(hashes) <= VECTOR_BUCKET:
                pairs = ((a, c) for a in range(len(hashes)) for c in range(a + 1, len(hashes))
                         if (hashes[a] ^ hashes[c]).bit_count() <= max_bits)
            else:
                arr = np.array(hashes, dtype=np.uint64)
                pairs = ((a, a + 1 + int(c)) for a in range(len(hashes) - 1)
                         for c in np.flatnonzero(hamming(arr[a + 1:], hashes[a]) <= max_bits))
            for a, c in pairs:
                parent[find(first[(label, hashes[a])])] = find(first[(label, hashes[c])])
    return [find(i) for i in range(len(items))]


def near_duplicate_groups_plain(items: list[Item], max_bits: int) -> list[list[int]]:
    """All pairs, quadratic: the reference `near_duplicate_groups` is held to in tests. Returns
    the groups as sorted lists of item indices."""
    parent = list(range(len(items)))
    find = functools.partial(_root, parent)
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            if items[i].label == items[j].label and (items[i].dhash ^ items[j].dhash).bit_count() <= max_bits:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(items)):
        groups[find(i)].append(i)
    return sorted(groups.values())


# --------------------------------------------------------------------------- splitting

UNEVEN_SHARE = 0.25     # a class's split this far off its share (and over 2 images) is reported


def assign_splits(items: list[Item], fractions: dict[str, float], seed: int, groups: list[int]) -> list[dict]:
    """Stratified, group-aware split: whole near-duplicate groups go to one split, per class.
    Returns the classes that groups kept from their shares (`uneven_split`).

    Per class, the groups are put in a seeded random order. Every split but the largest first gets
    one of the smallest groups (smallest split first), so that each has one; then the other groups
    go largest first (ties in the random order), each to the split furthest below its share, the
    largest split's first of all. Largest first matters where look-alike photos chain into one big
    group: it goes where it fits and the small groups even out the rest. Taken in random order, the
    first group went to the smallest split whatever its size (a group of 1,173 of a class's 1,200
    images became its test split). Where every group is one image, the order is the random one."""
    rng = random.Random(seed)
    uneven: list[dict] = []
    wanted = sorted((s for s in SPLITS if fractions[s] > 0), key=lambda s: (fractions[s], SPLITS.index(s)))
    per_class: dict[str, dict[int, list[Item]]] = defaultdict(lambda: defaultdict(list))
    for it, g in zip(items, groups):
        per_class[it.label][g].append(it)
    for label in sorted(per_class):
        glist = sorted(per_class[label].values(), key=lambda g: min(it.path for it in g))
        rng.shuffle(glist)
        by_size = sorted(glist, key=len)                  # stable (and with reverse=True): ties keep the random order
        seeds, rest = by_size[:len(wanted) - 1], sorted(by_size[len(wanted) - 1:], key=len, reverse=True)
        total = sum(len(g) for g in glist)
        count = {s: 0 for s in wanted}
        for target, group in [*zip(wanted, seeds), *((None, g) for g in rest)]:
            target = target or max(wanted, key=lambda s: (fractions[s] * total - count[s], -SPLITS.index(s)))
            for it in group:
                it.split = target
            count[target] += len(group)
        if (entry := uneven_split(label, count, {s: fractions[s] * total for s in wanted}, len(by_size[-1]))):
            uneven.append(entry)
    return uneven


def uneven_split(label: str, count: dict[str, int], share: dict[str, float], largest: int) -> dict | None:
    """A class whose split is more than UNEVEN_SHARE of its share (and over 2 images) off it, as
    report.json lists it; None for the usual class. Only a near-duplicate group too large to place
    does that: single images land within one of their share."""
    if all(abs(count[s] - share[s]) <= max(2.0, UNEVEN_SHARE * share[s]) for s in share):
        return None
    order = [s for s in SPLITS if s in share]
    return {"class": label, "images": {s: count[s] for s in order}, "share": {s: round(share[s]) for s in order},
            "largest_group": largest}


@functools.lru_cache(maxsize=1)
def _popcount16() -> np.ndarray:
    """Set bits of every 16-bit number: a table that counts a uint64's bits in four lookups."""
    return np.array([i.bit_count() for i in range(1 << 16)], dtype=np.uint8)


def hamming(hashes: np.ndarray, h: int) -> np.ndarray:
    """Bits in which each uint64 of `hashes` differs from `h` (numpy before 2.0 has no bitwise_count)."""
    return _popcount16()[(hashes ^ np.uint64(h)).view(np.uint16)].reshape(-1, 4).sum(1)


def near_duplicates_of_train(items: list[Item], max_bits: int) -> list[dict]:
    """The val and test images within `max_bits` of a train image of their class (dHash), each with
    the nearest one and the bits between. `assign_splits` keeps a near-duplicate group in one split,
    so only given split folders have them: a photo in valid/ that is nearly one in train/ is easier
    than a new photo, and its score says so. Measured photo to photo, not through a group's chain
    of look-alikes. Vectorised: every val or test image against its class's train hashes at once."""
    train: dict[str, list[Item]] = defaultdict(list)
    for it in sorted(items, key=lambda it: it.path):
        if it.split == "train":
            train[it.label].append(it)
    hashes = {label: np.array([it.dhash for it in its], dtype=np.uint64) for label, its in train.items()}
    found = []
    for it in items:
        if it.split == "train" or it.label not in train:
            continue
        bits = hamming(hashes[it.label], it.dhash)
        j = int(np.argmin(bits))                       # the first of the nearest, in path order
        if bits[j] <= max_bits:
            found.append({"path": shown(it.path), "class": it.label, "split": it.split,
                          "near": shown(train[it.label][j].path),
                          "bits": int(bits[j])})
    return sorted(found, key=lambda r: (SPLITS.index(r["split"]), r["path"]))


def split_items(items: list[Item], d: DataParams, has_splits: bool,
                skipped: list[dict]) -> tuple[list[Item], list[str], dict[str, list[dict]]]:
    """Decide each item's split; drops classes too small to split. Returns the items, the dropped
    classes and what report.json adds where there is any (so that a data set without prepares as it
    always did): `uneven_splits`, the classes whose split near-duplicate groups kept from its shares,
    and `near_duplicates_of_train`, val and test images nearly the same as one in train."""
    groups = near_duplicate_groups(items, d.near_duplicate_bits)
    fr = {"train": d.split.train, "val": d.split.val, "test": d.split.test}
    need = sum(1 for v in fr.values() if v > 0)
    uneven: list[dict] = []
    if has_splits:
        have_test = any(it.given_split == "test" for it in items)
        for it in items:
            it.split = it.given_split
        if not have_test and fr["test"] > 0:     # carve test out of train, group-aware
            pool = [(it, g) for it, g in zip(items, groups) if it.given_split == "train"]
            sub = {"train": fr["train"] / (fr["train"] + fr["test"]), "val": 0.0,
                   "test": fr["test"] / (fr["train"] + fr["test"])}
            uneven = assign_splits([it for it, _ in pool], sub, d.seed, [g for _, g in pool])
    counts: dict[str, int] = defaultdict(int)
    distinct: dict[str, set] = defaultdict(set)
    for it, g in zip(items, groups):
        counts[it.label] += 1
        distinct[it.label].add(g)
    dropped = sorted(lbl for lbl in counts
                     if counts[lbl] < d.min_images_per_class or len(distinct[lbl]) < need)
    # why, in each of its files' skip entry (the summary and report.json say it once per class)
    why = {lbl: "too few images" if counts[lbl] < d.min_images_per_class else
           f"near-duplicates: {counts[lbl]} images in {len(distinct[lbl])} group(s) within "
           f"data.near_duplicate_bits, fewer than the {need} splits" for lbl in dropped}
    keep = [(it, g) for it, g in zip(items, groups) if it.label not in dropped]
    if not has_splits:
        uneven = assign_splits([it for it, _ in keep], fr, d.seed, [g for _, g in keep])
    kept = [it for it, _ in keep]
    if has_splits:
        missing = sorted({it.label for it in kept} - {it.label for it in kept if it.split == "train"})
        for lbl in missing:
            why[lbl] = "too few images"
        dropped += missing
        kept = [it for it in kept if it.label not in missing]
    for it in items:
        if it.label in dropped:
            skipped.append({"path": shown(it.path), "reason": f"class {it.label} dropped ({why[it.label]})"})
    notes = {"uneven_splits": [u for u in uneven if u["class"] not in dropped],
             "near_duplicates_of_train": near_duplicates_of_train(kept, d.near_duplicate_bits)}
    return kept, sorted(dropped), {k: v for k, v in notes.items() if v}


# --------------------------------------------------------------------------- main

def remove_stale_temps(out: Path) -> None:
    """Temp folders a killed run left beside `out` (.prepared.*.tmp): DVC lets one prepare run at a
    time, so any that exist now are dead."""
    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


MOVE_CHUNK_BYTES = 64 << 20     # move_rows reads the scan array this much at a time


def move_rows(scan: Path, offset: int, shape: tuple[int, ...], dest: dict[int, tuple[np.ndarray, int]]) -> None:
    """Copy each row of the scan array (the .npy file `scan`, data from byte `offset`, rows of `shape`)
    to its place in the split arrays, `dest[row] = (array, index)`; rows not in `dest` (duplicates,
    dropped classes) are left. The scan is read from its end, a chunk at a time, and cut short after
    each chunk, so the disk holds the images about once, not twice: the split arrays are sparse
    files that fill as the scan shrinks. Through `dvc repro prepare` on 37,500 birds-like JPEGs at 256
    px: 6.97 GiB of disk at the peak and 6.91 after, where copying the whole scan before deleting it
    held 13.77 GiB; 97-108 s either way."""
    row_bytes = int(np.prod(shape))
    chunk = max(1, MOVE_CHUNK_BYTES // row_bytes)
    top = max(dest, default=-1) + 1
    with open(scan, "r+b") as f:
        f.truncate(offset + top * row_bytes)      # rows past the last one kept are not read at all
        for lo in range((top - 1) // chunk * chunk, -1, -chunk):
            hi = min(lo + chunk, top)
            f.seek(offset + lo * row_bytes)
            block = np.frombuffer(f.read((hi - lo) * row_bytes), np.uint8).reshape(hi - lo, *shape)
            for r in range(lo, hi):
                if r in dest:
                    x, i = dest[r]
                    x[i] = block[r - lo]
            f.truncate(offset + lo * row_bytes)


def channel_stats(x: np.ndarray, chunk_bytes: int = 1 << 24) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images, on the [0, 1] scale.

    What it computes is plain: `a = x.reshape(-1, 3) / 255`, then each column's mean and population
    std (tests/test_prepare.py holds it to exactly that). How: exact integer sums of the values
    and of their squares, streamed over chunks of about `chunk_bytes` (flat memory), each chunk seen
    as rows of one image row (W x 3 bytes), so numpy sums along contiguous memory; the squares fit
    uint16 (255^2 = 65,025). For the birds train split (24,706 images at 256 px) float64 arithmetic
    took about 59 s on 2 cores, this about 5 s; `prepare` runs it once, on the train array it has
    just written (in the page cache), and every training run reads the result (`arrays.json`).
    The mean and variance are then one correctly rounded division each of exact integers."""
    n, h, w, c = x.shape
    total, squares = np.zeros(c, dtype=np.uint64), np.zeros(c, dtype=np.uint64)
    step = max(1, chunk_bytes // max(h * w * c, 1))
    for i in range(0, n, step):
        rows = np.ascontiguousarray(x[i:i + step]).reshape(-1, w * c)
        total += rows.sum(axis=0, dtype=np.uint64).reshape(w, c).sum(axis=0)
        sq = rows.astype(np.uint16)
        sq *= sq
        squares += sq.sum(axis=0, dtype=np.uint64).reshape(w, c).sum(axis=0)
    count = n * h * w
    if count == 0:
        return [0.0] * c, [1e-6] * c
    t, q = [int(v) for v in total], [int(v) for v in squares]
    mean = [t[k] / (count * 255) for k in range(c)]
    var = [(count * q[k] - t[k] * t[k]) / (count * count * 255 * 255) for k in range(c)]
    return mean, [math.sqrt(max(v, 1e-12)) for v in var]


def describe_arrays(folder: Path) -> dict:
    """What `arrays.json` holds: the sha1 of every array file, and the train split's per-channel mean
    and std (`channel_stats`). Training reads both. The statistics normalize its inputs, computed once
    here instead of in each of a study's 41 runs (about 5 s each at the birds set's size on 2 cores).
    The digests join a run's fingerprint: arrays that change while the manifest does not (other
    resizing code, another Pillow) then start the runs over, instead of letting them find their old
    checkpoints "already finished". sha1 reads about 1.8 GiB/s here (SHA extensions)."""
    files = {}
    for split in SPLITS:
        for part in ("x", "y"):
            with open(folder / f"{split}_{part}.npy", "rb") as f:
                files[f"{split}_{part}.npy"] = hashlib.file_digest(f, "sha1").hexdigest()
    x = np.load(folder / "train_x.npy", mmap_mode="r")
    mean, std = channel_stats(x)
    return {"files": files, "train": {"images": len(x), "mean": mean, "std": std}}


def check_disk(out: Path, images: int, size: int) -> None:
    """Refuse, in one line, a prepare that cannot fit on the disk. The decoded images need `images` x
    size x size x 3 bytes beside `out` (move_rows keeps the peak there). Past a full disk, a write into
    a memory-mapped array does not raise: the process dies of SIGBUS ("Bus error", exit 135), as it did
    here on a 1 MiB tmpfs."""
    need = images * size * size * 3
    where = next(p for p in (out.parent, *out.parent.parents) if p.exists())   # the folder may not exist yet
    free = shutil.disk_usage(where).free
    if need > free:
        raise UserError(f"{out}: {images} images at {size}x{size} need {size_text(need)} of disk while prepare "
                        f"runs, and {where.resolve()} has {size_text(free)} free; free some, or lower data.image_size")


def size_text(n: int) -> str:
    """Bytes as GiB, or MiB under one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def prepare(d: DataParams, out: Path = OUT) -> dict:
    root = Path(d.root)
    remove_stale_temps(out)
    items, skipped, has_splits = discover(root, d)
    if not items:
        raise UserError(f"data.root: {shown(root)} holds no image files in class folders")
    check_disk(out, len(items), d.image_size)
    with atomic_dir(out) as tmp:
        buffer = np.lib.format.open_memmap(tmp / "scan.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(items), d.image_size, d.image_size, 3))
        items = decode_all(items, d, buffer, skipped)
        items = drop_exact_duplicates(items, skipped)
        items, dropped, notes = split_items(items, d, has_splits, skipped)
        classes = sorted({it.label for it in items})
        if len(classes) < 2:
            raise UserError(f"data.root: {shown(root)}: {len(classes)} usable class(es) left after skipping bad files "
                            f"and classes under data.min_images_per_class={d.min_images_per_class}; need at least 2")
        index = {c: i for i, c in enumerate(classes)}
        offset, shape = buffer.offset, buffer.shape[1:]
        buffer.flush()
        del buffer                                # move_rows reads the file, and cuts it short
        dest: dict[int, tuple[np.ndarray, int]] = {}
        outs = []
        near = {(r["split"], r["path"]): r for r in notes.get("near_duplicates_of_train", [])}
        for split in SPLITS:
            rows = sorted((it for it in items if it.split == split), key=lambda it: (it.label, it.path))
            x = np.lib.format.open_memmap(tmp / f"{split}_x.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(rows), *shape))
            for i, it in enumerate(rows):
                dest[it.row] = (x, i)
                if entry := near.get((split, shown(it.path))):    # where evaluate finds each near-duplicate
                    entry["row"] = i
            outs.append(x)
            np.save(tmp / f"{split}_y.npy", np.array([index[it.label] for it in rows], dtype=np.int64))
        move_rows(tmp / "scan.npy", offset, shape, dest)
        for x in outs:
            x.flush()
        del outs, dest, x
        (tmp / "scan.npy").unlink()
        write_json(tmp / "arrays.json", describe_arrays(tmp))
        manifest = [{"path": shown(it.path), "sha1": it.sha1, "class": it.label, "split": it.split,
                     "width": it.size[0], "height": it.size[1], "mode": it.mode}
                    for it in sorted(items, key=lambda it: (SPLITS.index(it.split), it.label, it.path))]
        write_csv(tmp / "manifest.csv", manifest)
        write_json(tmp / "classes.json", classes)
        counts = {c: {s: sum(1 for it in items if it.label == c and it.split == s) for s in SPLITS}
                  for c in classes}
        report = {
            "root": shown(root), "layout": "given splits" if has_splits else "class folders",
            "image_size": d.image_size, "seed": d.seed, "classes": len(classes),
            "images": {s: sum(v[s] for v in counts.values()) for s in SPLITS},
            "per_class": counts, "dropped_classes": dropped,
            "skipped": sorted(skipped, key=lambda r: r["path"]),
        }
        report.update(notes)        # only those with entries: a data set without any prepares as before
        write_json(tmp / "report.json", report)
    return report


def skip_kind(reason: str) -> str:
    """A skip reason without its particulars ("exact duplicate of x.jpg" -> "exact duplicate"), to count
    skipped files by kind (this summary and the report's data-set section)."""
    if reason.startswith("class "):
        return "in a dropped class"
    return reason.split(" of ")[0].split(" (")[0].split(":")[0]


def split_against_shares(u: dict) -> str:
    """An `uneven_splits` entry's counts against its shares, e.g. "train 30 / test 3 against shares of 22 /
    7" (prepare's summary and the study report)."""
    return (f"{' / '.join(f'{s} {n}' for s, n in u['images'].items())} against shares of "
            f"{' / '.join(str(n) for n in u['share'].values())}")


def near_counts(near: list[dict]) -> str:
    """`near_duplicates_of_train` counted per split, e.g. "143 val and 2 test"."""
    return " and ".join(f"{n} {s}" for s in SPLITS if (n := sum(r["split"] == s for r in near)))


def summary(report: dict, out: Path = OUT) -> str:
    """What prepare made, in a few lines: the per-class table and every skipped file are in report.json."""
    images = report["images"]
    lines = [f"prepare: {report['classes']} classes from {report['root']} ({report['layout']}) at "
             f"{report['image_size']}x{report['image_size']}: " + ", ".join(f"{images[s]} {s}" for s in SPLITS)]
    by_reason: dict[str, set[str]] = defaultdict(set)
    for r in report["skipped"]:
        m = re.fullmatch(r"class (.*) dropped \((.*)\)", r["reason"])
        if m:
            by_reason[m[2].split(":")[0]].add(m[1])
    for reason, classes in sorted(by_reason.items()):
        lines.append(f"  {len(classes)} class(es) dropped, {reason}: {', '.join(sorted(classes))}")
    if report["skipped"]:
        reasons: dict[str, int] = defaultdict(int)
        for r in report["skipped"]:
            reasons[skip_kind(r["reason"])] += 1
        lines.append(f"  {len(report['skipped'])} file(s) skipped: " +
                     ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])))
    uneven = report.get("uneven_splits", [])
    if uneven:
        lines.append(f"  warning: {len(uneven)} class(es) split off their shares, a near-duplicate group too large "
                     f"to place (a lower data.near_duplicate_bits splits them finer): "
                     + ", ".join(f"{u['class']} ({split_against_shares(u)}; largest group {u['largest_group']})"
                                 for u in uneven[:3])
                     + (f" and {len(uneven) - 3} more" if len(uneven) > 3 else ""))
    near = report.get("near_duplicates_of_train", [])
    if near:
        lines.append(f"  warning: {near_counts(near)} image(s) have a near-duplicate in train (the given split "
                     f"folders; dHash within data.near_duplicate_bits), so their scores may be too good: each is "
                     f"listed with it")
    lines.append(f"  per class and every skipped file: {out}/report.json")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    no_options(argv, "prepare", __doc__, "data.*")
    p = load_params()
    report = prepare(p.data)
    console.print(summary(report), markup=False, soft_wrap=True)


if __name__ == "__main__":
    run_cli(main)
