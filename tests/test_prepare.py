"""prepare: every bad input is skipped with a reason, splits are stratified, deterministic and leak-free."""
import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnorm.io import UserError
from resnorm.params import load_params
from resnorm.prepare import OUT, Item, assign_splits, prepare
from conftest import TINY, make_dataset, make_image, write_params


def run(workdir, root, **data):
    write_params(workdir, {**TINY, "data": {**TINY["data"], "root": str(root), **data}})
    return prepare(load_params().data)


def reasons(report):
    return {Path(s["path"]).name: s["reason"] for s in report["skipped"]}


def manifest():
    with open(OUT / "manifest.csv") as f:
        return list(csv.DictReader(f))


def test_bad_inputs_are_skipped_with_reasons(workdir, tmp_path):
    root = make_dataset(tmp_path / "src", classes=3, per_class=10)
    bad = root / "class_0"
    good = (bad / "img_000.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is a text file with a .jpg name")
    (bad / "notes.txt").write_text("hello")
    Image.new("RGB", (1, 1)).save(bad / "tiny.png")
    Image.new("L", (3000, 3000)).save(bad / "bomb.png")        # over the max_image_pixels set below
    (root / "empty_class").mkdir()
    make_image(root / "class_1" / "with space ü.jpg", 1, 99)    # odd file names are fine
    os.symlink(root / "class_1", root / "class_1" / "loop")      # a directory symlink loop
    report = run(workdir, root, max_image_pixels=4_000_000)
    r = reasons(report)
    assert "cannot decode" in r["truncated.jpg"] or "truncated" in r["truncated.jpg"]
    assert r["corrupt.jpg"].startswith(("cannot decode", "not a readable image"))
    assert r["text.jpg"] == "not a readable image"
    assert r["empty.jpg"] == "zero-byte file"
    assert "not an image" in r["notes.txt"]
    assert "too small" in r["tiny.png"]
    assert "too large" in r["bomb.png"] or "bomb" in r["bomb.png"]
    assert any(s["reason"] == "empty class folder" for s in report["skipped"])
    assert report["classes"] == 3
    assert any(row["path"].endswith("with space ü.jpg") for row in manifest())
    x = np.load(OUT / "train_x.npy", mmap_mode="r")
    assert x.dtype == np.uint8 and x.shape[1:] == (16, 16, 3)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_any_mode_becomes_rgb(workdir, tmp_path, mode):
    root = make_dataset(tmp_path / "src", classes=2, per_class=8)
    a = (np.arange(40 * 40).reshape(40, 40) * 37 % 65535).astype(np.uint16)
    img = Image.fromarray(a).convert("I;16") if mode == "I;16" else Image.new("RGB", (40, 40), (200, 30, 30)).convert(mode)
    img.save(root / "class_0" / f"odd_{mode.replace(';', '')}.{'tiff' if mode == 'CMYK' else 'png'}")
    report = run(workdir, root)
    assert not report["skipped"], report["skipped"]
    assert sum(report["images"].values()) == 17


def test_exif_orientation_is_applied(workdir, tmp_path):
    root = make_dataset(tmp_path / "src", classes=2, per_class=8)
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255                                   # left half white: after a 90 degree turn, top or bottom
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6                                  # orientation: rotate 90 CW on display
    img.save(root / "class_0" / "rotated.jpg", exif=exif, quality=95)
    run(workdir, root, split={"train": 1 / 3, "val": 1 / 3, "test": 1 / 3})
    rows = manifest()
    row = next(r for r in rows if r["path"].endswith("rotated.jpg"))
    x = np.load(OUT / f"{row['split']}_x.npy")
    i = [r["path"] for r in rows if r["split"] == row["split"]].index(row["path"])
    img = x[i].astype(int)
    top, bottom = img[:8].mean(), img[8:].mean()
    assert abs(top - bottom) > 100                   # the white half is now on top or bottom, not left


def test_split_is_stratified_deterministic_and_leak_free(workdir, tmp_path):
    root = make_dataset(tmp_path / "src", classes=3, per_class=20)
    # exact duplicates across classes' files and within a class
    (root / "class_0" / "dup.jpg").write_bytes((root / "class_0" / "img_001.jpg").read_bytes())
    report = run(workdir, root)
    first = manifest()
    assert "exact duplicate of" in reasons(report)["img_001.jpg"]      # dup.jpg sorts first and is kept
    for c, counts in report["per_class"].items():
        assert counts["train"] >= 10 and counts["val"] >= 2 and counts["test"] >= 2, (c, counts)
    assert "uneven_splits" not in report          # listed only when some class has one: report.json as before
    hashes = {}
    for row in first:
        assert hashes.setdefault(row["sha1"], row["split"]) == row["split"]
    assert len({r["sha1"] for r in first}) == len(first)
    x1 = np.load(OUT / "train_x.npy")
    run(workdir, root)
    assert manifest() == first
    assert np.array_equal(np.load(OUT / "train_x.npy"), x1)
    run(workdir, root, seed=1)
    assert manifest() != first


def test_near_duplicates_stay_in_one_split(workdir, tmp_path):
    root = make_dataset(tmp_path / "src", classes=2, per_class=12)
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)   # a photo-like smooth picture
    src = Image.fromarray(smooth)
    src.save(root / "class_0" / "img_000.jpg", quality=95)
    for q in (50, 70, 90):                                 # re-encodings: different bytes, same picture
        src.save(root / "class_0" / f"copy_q{q}.jpg", quality=q)
    run(workdir, root)
    rows = [r for r in manifest() if "class_0/img_000" in r["path"] or "copy_q" in r["path"]]
    assert len(rows) == 4 and len({r["split"] for r in rows}) == 1


def test_a_large_group_goes_to_the_split_it_fits_whatever_the_seed():
    """Largest first: a group of 100 beside 6 single images lands in train (share 74 of 106), and the
    singles go to val and test, 3 each; the class is reported as off its shares (3 of 16). Taken in
    random order, the first group went to the smallest split: with seed 3 the 100 were val, with 11 test."""
    for seed in range(12):
        items = [Item(f"c/{i:03d}.jpg", "c", None) for i in range(106)]
        uneven = assign_splits(items, {"train": 0.7, "val": 0.15, "test": 0.15}, seed, [0] * 100 + list(range(1, 7)))
        assert uneven == [{"class": "c", "images": {"train": 100, "val": 3, "test": 3},
                           "share": {"train": 74, "val": 16, "test": 16}, "largest_group": 100}], seed
        assert {it.split for it in items[:100]} == {"train"}, seed
    # three groups for three splits: one each, the largest to train
    items = [Item(f"c/{i}.jpg", "c", None) for i in range(12)]
    assign_splits(items, {"train": 0.7, "val": 0.15, "test": 0.15}, 0, [0] * 10 + [1, 2])
    assert items[9].split == "train" and {items[10].split, items[11].split} == {"val", "test"}


def test_a_class_split_off_its_shares_is_reported(workdir, tmp_path):
    """A chain of look-alikes (one dHash group of 30) beside 6 distinct photos: train takes the 30,
    val and test 3 each against shares of 7.2 (TINY's 60/20/20); report.json, the summary and the study
    report say so."""
    from resnorm.prepare import summary
    from resnorm.report import class_table, split_notes
    root = make_dataset(tmp_path / "src", classes=2, per_class=12)
    for i in range(30):                                   # one colour, tiny shifts: one near-duplicate group
        Image.new("RGB", (24, 24), (200, 30, 10 + i)).save(root / "class_0" / f"flat_{i:02d}.png")
    for f in list((root / "class_0").glob("img_*"))[6:]:
        f.unlink()
    report = run(workdir, root)
    assert report["uneven_splits"] == [{"class": "class_0", "images": {"train": 30, "val": 3, "test": 3},
                                        "share": {"train": 22, "val": 7, "test": 7}, "largest_group": 30}]
    assert {r["split"] for r in manifest() if "flat_" in r["path"]} == {"train"}
    assert "warning: 1 class(es) split off their shares" in summary(report) and "class_0 (train 30 / val 3 / test 3" in summary(report)
    assert "class_0, train 30 / val 3 / test 3 against shares of 22 / 7 / 7 (largest group 30)" in split_notes(report)
    assert "near-duplicate in train" not in split_notes(report) and split_notes({}) == ""
    header, rows = class_table(report)
    assert header == ["class", "train", "val", "test", "note"]
    assert rows == [["class_0", "30", "3", "3", "split off its shares (largest group 30)"], ["class_1", "7", "3", "2", ""]]


def test_same_content_in_two_classes_is_dropped(workdir, tmp_path):
    root = make_dataset(tmp_path / "src", classes=2, per_class=10)
    (root / "class_1" / "stolen.jpg").write_bytes((root / "class_0" / "img_002.jpg").read_bytes())
    r = reasons(run(workdir, root))
    assert "labelled" in r["stolen.jpg"] and "labelled" in r["img_002.jpg"]


def test_small_class_dropped_and_too_few_classes_refused(workdir, tmp_path):
    root = make_dataset(tmp_path / "src", classes=3, per_class=10)
    for f in list((root / "class_2").iterdir())[3:]:
        f.unlink()
    report = run(workdir, root)
    assert report["dropped_classes"] == ["class_2"] and report["classes"] == 2
    for f in list((root / "class_1").iterdir())[3:]:
        f.unlink()
    before = (OUT / "manifest.csv").read_bytes()
    with pytest.raises(UserError, match="need at least 2"):
        run(workdir, root)
    assert (OUT / "manifest.csv").read_bytes() == before          # the previous output is intact
    assert not [p for p in OUT.parent.iterdir() if p.name.endswith(".tmp")]


def test_given_splits_and_test_carved_from_train(workdir, tmp_path):
    root = tmp_path / "birds"
    make_dataset(root / "train", classes=3, per_class=15)
    for c in range(3):
        for i in range(4):
            make_image(root / "valid" / f"class_{c}" / f"v{i}.jpg", c, 500 + i)
    report = run(workdir, root)
    assert report["layout"] == "given splits"
    assert all(v["val"] == 4 for v in report["per_class"].values())
    assert all(v["test"] >= 2 and v["train"] + v["test"] == 15 for v in report["per_class"].values())
    rows = manifest()
    assert all("/valid/" in r["path"] for r in rows if r["split"] == "val")
    assert all("/train/" in r["path"] for r in rows if r["split"] in ("train", "test"))


def test_a_val_photo_nearly_one_in_train_is_listed(workdir, tmp_path):
    """A re-encoding of a train/ photo in valid/ (other bytes, the same picture; given train, valid and
    test folders): prepare keeps the given splits and lists the val image with its train twin; the
    summary and the report say so. An exact copy is no such case: it is skipped as a duplicate."""
    from resnorm.prepare import summary
    from resnorm.report import class_table, split_notes
    root = tmp_path / "birds"
    make_dataset(root / "train", classes=3, per_class=15)
    for c in range(3):
        for i in range(4):
            make_image(root / "valid" / f"class_{c}" / f"v{i}.jpg", c, 500 + i)
            make_image(root / "test" / f"class_{c}" / f"t{i}.jpg", c, 700 + i)
    Image.open(root / "train" / "class_1" / "img_003.jpg").save(root / "valid" / "class_1" / "twin.jpg", quality=60)
    report = run(workdir, root)
    [entry] = report["near_duplicates_of_train"]
    assert entry["path"] == str(root / "valid" / "class_1" / "twin.jpg") and entry["split"] == "val"
    assert entry["near"] == str(root / "train" / "class_1" / "img_003.jpg") and entry["bits"] <= 4
    assert "warning: 1 val image(s) have a near-duplicate in train" in summary(report)
    assert "1 val image(s) have a near-duplicate in train" in split_notes(report)
    assert entry["class"] == "class_1"
    from resnorm.evaluate import near_train_rows, without_rows
    from resnorm.prepare import load_image
    [row] = near_train_rows()["val"]              # the row of the prepared val arrays that holds the twin
    twin = load_image(str(root / "valid" / "class_1" / "twin.jpg"), 16, 10 ** 8)[0]
    assert np.array_equal(np.load(OUT / "val_x.npy")[row], twin) and list(near_train_rows()) == ["val"]
    y = np.load(OUT / "val_y.npy")
    wrong = np.where(np.arange(len(y)) == row, (y + 1) % 3, y)   # only the twin predicted wrong
    assert without_rows(y, wrong, [row], 3) == {"images": len(y) - 1, "excluded": 1, "accuracy": 1.0, "macro_f1": 1.0,
                                                "excluded_accuracy": 0.0}
    header, rows = class_table(report)
    assert header[-1] == "note" and [r[-1] for r in rows] == ["", "1 val near a train image", ""]
    assert entry["row"] == row
    from resnorm.io import write_json
    del entry["row"]                              # a report.json of older prepare code
    write_json(OUT / "report.json", report)
    with pytest.raises(UserError, match="report.json: near-duplicates without their rows.*dvc repro prepare"):
        near_train_rows()
    (root / "valid" / "class_1" / "twin.jpg").unlink()
    (root / "valid" / "class_2" / "copy.jpg").write_bytes((root / "train" / "class_2" / "img_001.jpg").read_bytes())
    report = run(workdir, root)
    assert "near_duplicates_of_train" not in report and reasons(report)["copy.jpg"].startswith("exact duplicate of")
    assert class_table(report)[0] == ["class", "train", "val", "test"]        # no note column where there is none


def test_hamming_counts_the_bits_python_counts():
    """The table lookup that compares a val image's dHash with every train one, against int.bit_count."""
    from resnorm.prepare import hamming
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**64, 500, dtype=np.uint64, endpoint=False)
    for h in [0, 2**64 - 1, *map(int, hashes[:20])]:
        assert hamming(hashes, h).tolist() == [(int(x) ^ h).bit_count() for x in hashes]


def test_missing_root_is_a_clear_error(workdir, tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        run(workdir, tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="no image files"):
        run(workdir, tmp_path / "flat")


def test_interrupted_prepare_leaves_no_half_written_output(workdir, tmp_path, monkeypatch):
    import resnorm.prepare as prep

    root = make_dataset(tmp_path / "src", classes=2, per_class=8)
    run(workdir, root)
    before = {p.name: p.read_bytes() for p in OUT.iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        run(workdir, root, image_size=24)
    assert {p.name: p.read_bytes() for p in OUT.iterdir()} == before
    assert [p.name for p in OUT.parent.iterdir()] == [OUT.name]


def test_moving_the_rows_gives_the_scans_disk_back_as_it_goes(tmp_path, monkeypatch):
    """move_rows puts every kept row of the scan array in its place, and the scan shrinks as the split
    arrays fill: when a row is written, the scan no longer holds the rows above its chunk."""
    import resnorm.prepare as prep

    shape, rows, chunk = (4, 4, 3), 23, 5
    scan = tmp_path / "scan.npy"
    data = np.random.default_rng(0).integers(0, 256, (rows, *shape), dtype=np.uint8)
    np.save(scan, data)
    offset = np.load(scan, mmap_mode="r").offset
    row_bytes = int(np.prod(shape))
    monkeypatch.setattr(prep, "MOVE_CHUNK_BYTES", chunk * row_bytes)

    class Spy:
        """A split array that records the scan's size at each write."""
        def __init__(self, n):
            self.a, self.sizes = np.zeros((n, *shape), np.uint8), {}

        def __setitem__(self, i, v):
            self.sizes[i] = scan.stat().st_size
            self.a[i] = v

    kept = [r for r in range(rows) if r % 7 != 3][:-2]     # some rows dropped, the last two among them
    train, test = Spy(len(kept) - 4), Spy(4)
    dest = {r: (train, i) if i < len(kept) - 4 else (test, i - len(kept) + 4) for i, r in enumerate(kept)}
    prep.move_rows(scan, offset, shape, dest)
    assert np.array_equal(np.concatenate([train.a, test.a]), data[kept])
    for r, (arr, i) in dest.items():
        assert arr.sizes[i] <= offset + (r // chunk + 1) * chunk * row_bytes, r
    assert scan.stat().st_size == offset


def test_a_disk_too_small_is_one_line_before_any_work(workdir, tmp_path, monkeypatch):
    """Past a full disk a memory-mapped write kills prepare with SIGBUS, so the space is checked first:
    one line naming what is needed and what is free; the last good output stays."""
    from collections import namedtuple
    import resnorm.prepare as prep

    root = make_dataset(tmp_path / "src", classes=2, per_class=8)
    run(workdir, root)
    before = {p.name: p.read_bytes() for p in OUT.iterdir()}
    need = 16 * 64 * 64 * 3
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(prep.shutil, "disk_usage", lambda path: usage(10 ** 9, 0, 100 << 10))
    with pytest.raises(UserError, match=r"16 images at 64x64 need 0\.2 MiB of disk while prepare runs, and .* "
                                        r"has 0\.1 MiB free; free some, or lower data\.image_size"):
        run(workdir, root, image_size=64)
    assert {p.name: p.read_bytes() for p in OUT.iterdir()} == before
    monkeypatch.setattr(prep.shutil, "disk_usage", lambda path: usage(10 ** 9, 0, need))
    assert run(workdir, root, image_size=64)["image_size"] == 64          # just enough


def test_channel_stats_are_the_plain_formula_exactly_and_any_chunking_gives_the_same_bits(tmp_path):
    """channel_stats sums integers along image rows; it must be `x.reshape(-1, 3) / 255` and each
    column's mean and population std, to the last bit a correctly rounded exact value allows."""
    from fractions import Fraction
    from resnorm.prepare import channel_stats
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    x[..., 2] //= 3                                       # channels with other means
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")  # as training reads the split
    mean, std = channel_stats(mapped)
    for chunk in (1, 100, 181, 1 << 24):                # one image per chunk, a few, all at once
        assert channel_stats(mapped, chunk_bytes=chunk) == (mean, std)
    pixels = x.reshape(-1, 3).astype(int)
    for k in range(3):                                  # exact rational arithmetic as the truth
        values = [Fraction(int(v), 255) for v in pixels[:, k]]
        m = sum(values) / len(values)
        var = sum((v - m) ** 2 for v in values) / len(values)
        assert mean[k] == float(m)
        assert std[k] == pytest.approx(math.sqrt(float(var)), rel=2e-16)
    plain = pixels / 255.0
    np.testing.assert_allclose(mean, plain.mean(0), rtol=1e-13)
    np.testing.assert_allclose(std, plain.std(0), rtol=1e-13)
    flat = np.full((2, 4, 4, 3), 51, dtype=np.uint8)   # one colour: std floored, not 0 (it divides)
    assert channel_stats(flat) == ([0.2] * 3, [1e-6] * 3)


def test_arrays_json_holds_every_array_digest_and_the_train_stats_that_training_reads(workdir, tmp_path):
    """prepare computes the train split's mean and std once (`channel_stats` of train_x) and each
    array's sha1; `load_train_stats` gives those numbers, and refuses, in one line naming the file, a
    prepared folder without them (older code) or with something else in their place."""
    import hashlib
    from resnorm.data import load_train_stats
    from resnorm.io import read_json, write_json
    from resnorm.prepare import channel_stats
    run(workdir, make_dataset(tmp_path / "src", classes=3, per_class=10))
    arrays = read_json(OUT / "arrays.json")
    x = np.load(OUT / "train_x.npy", mmap_mode="r")
    assert arrays["train"] == {"images": len(x), "mean": channel_stats(x)[0], "std": channel_stats(x)[1]}
    assert load_train_stats() == channel_stats(x)
    assert sorted(arrays["files"]) == sorted(f"{s}_{k}.npy" for s in ("train", "val", "test") for k in "xy")
    for name, digest in arrays["files"].items():
        assert hashlib.sha1((OUT / name).read_bytes()).hexdigest() == digest
    for broken, says in (({**arrays, "train": {"mean": [0.5] * 3}}, "no per-channel mean and std"),
                         ({**arrays, "train": {**arrays["train"], "std": [0.5, 0.0, 0.5]}}, "no per-channel"),
                         ([1, 2], "not valid")):
        write_json(OUT / "arrays.json", broken)
        with pytest.raises(UserError, match=f"arrays.json: {says}.*dvc repro -f prepare"):
            load_train_stats()
    (OUT / "arrays.json").unlink()
    with pytest.raises(UserError, match="arrays.json: not found; run `dvc repro prepare`"):
        load_train_stats()
