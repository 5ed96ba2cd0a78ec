"""Near-duplicate grouping in prepare: the bucketed version against all pairs, on the worst case.

  python bench/bench_prepare.py [--sizes 2000,4000,20000] [--files 2000]

Same-colour images all share one dHash, so one band bucket holds every image of the class:
comparing all pairs there was quadratic (3.8 s at 2,000 files, 13 s at 4,000, over 300 s at
20,000, measured through prepare before the change). `near_duplicate_groups` links equal hashes
first and compares only distinct ones. Also times the all-pairs reference where it is quick
enough, and (--files) a whole `prepare` over that many same-colour PNG files. Then distinct
hashes that all share one band, as look-alike photos give: every pair of a bucket is compared
(numpy), where comparing each hash with its next 256 only had missed pairs.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from resnorm.prepare import Item, near_duplicate_groups, near_duplicate_groups_plain, prepare  # noqa: E402
from resnorm.params import DataParams, SplitParams  # noqa: E402


def timed(f, *a):
    t0 = time.perf_counter()
    out = f(*a)
    return out, time.perf_counter() - t0


def grouping(what: str, items: list[Item]) -> None:
    """Print how long near_duplicate_groups takes on `items` at 4 bits, and all pairs where quick enough."""
    groups, fast = timed(near_duplicate_groups, items, 4)
    line = f"{what}: grouped in {fast:.3f} s ({len(set(groups))} group(s))"
    if len(items) <= 2000:
        _, plain = timed(near_duplicate_groups_plain, items, 4)
        line += f"; all pairs {plain:.1f} s"
    print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000,4000,20000")
    ap.add_argument("--files", type=int, default=2000, help="also a whole prepare over this many files (0: skip)")
    args = ap.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        grouping(f"{n:>6} same-colour images", [Item(str(i), "same colour", None, dhash=0) for i in range(n)])
        # look-alike photos: distinct hashes that share a band (the low 12 bits at 4 bits), so one bucket
        # holds them all and every pair in it is compared (numpy)
        rng = random.Random(0)
        hashes = set()
        while len(hashes) < n:
            hashes.add(rng.getrandbits(52) << 12)
        grouping(f"{n:>6} distinct hashes in one bucket",
                 [Item(str(i), "look-alike", None, dhash=h) for i, h in enumerate(sorted(hashes))])
    if args.files:
        from PIL import Image
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "src"
            for c in range(3):
                (root / f"class_{c}").mkdir(parents=True)
                for i in range(args.files // 3):
                    # flat images, each a slightly different colour: distinct bytes, one dHash (0)
                    Image.new("RGB", (32, 32), (80 * c, (i // 256) % 256, i % 256)).save(root / f"class_{c}" / f"{i}.png")
                for i in range(10):                         # a few distinct images so each class survives
                    Image.effect_noise((32, 32), 60 + 10 * i).convert("RGB").save(root / f"class_{c}" / f"n{i}.png")
            d = DataParams(root=str(root), image_size=16, split=SplitParams(), min_images_per_class=2)
            report, secs = timed(prepare, d, Path(tmp) / "prepared")
            print(f"prepare over {args.files // 3 * 3 + 30} files ({args.files // 3 * 3} same-colour): {secs:.1f} s, "
                  f"{sum(report['images'].values())} images kept ({len(report['skipped'])} skipped)", flush=True)


if __name__ == "__main__":
    main()
