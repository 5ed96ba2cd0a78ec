"""resnorm.predict: a checkpoint classifies image files as the pipeline classifies their prepared rows."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from resnorm.data import load_split
from resnorm.io import UserError, read_csv
from resnorm.metrics import predict
from resnorm.params import load_params
from resnorm.predict import classify, image_files, load_model
from resnorm.train import run_paths, train


def test_predict_matches_the_pipeline_on_the_same_files(prepared, tiny_data):
    train(load_params())
    best = run_paths(None, None).best
    model, info = load_model(best)
    assert info["image_size"] == 16 and info["classes"] == ["class_0", "class_1", "class_2"]
    rows = [r for r in read_csv("data/prepared/manifest.csv") if r["split"] == "test"]
    test = load_split("test")
    _, pred, prob = predict(model, test, info["mean"], info["std"], 64, torch.device("cpu"))
    files = [r["path"] for r in rows]                 # the manifest lists each split in its rows' order
    got = classify(model, info, files, top_k=3)
    assert len(got) == len(test)
    for (path, top), p in zip(got, prob):
        assert [c for c, _ in top] == [info["classes"][i] for i in np.argsort(-p, kind="stable")[:3]]
        assert top[0][1] == pytest.approx(float(p.max()), abs=1e-4)


def test_predict_cli_prints_top_k_for_a_folder_and_fails_in_one_line(prepared, tiny_data):
    train(load_params())
    best = run_paths(None, None).best
    r = subprocess.run([sys.executable, "-m", "resnorm.predict", str(best), str(tiny_data / "class_1"),
                        "--top-k", "2", "--json", "out.json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(image_files(tiny_data / "class_1")) and all(len(x.split("\t")) == 2 for x in lines)
    assert all(len(x.split("\t")[1].split("  ")) == 2 for x in lines)
    bad = subprocess.run([sys.executable, "-m", "resnorm.predict", "nothing.pt", str(tiny_data)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nothing.pt" in bad.stderr
    with pytest.raises(UserError, match="no such file"):
        image_files("missing-folder")


def test_unreadable_images_get_prepares_reason_and_only_all_unreadable_fails(prepared, tiny_data, tmp_path, capsys):
    from PIL import Image

    from resnorm.predict import MAX_PIXELS, main
    from resnorm.prepare import _load_worker

    train(load_params())
    best = str(run_paths(None, None).best)
    model, info = load_model(best)
    bad = tmp_path / "bad"
    bad.mkdir()
    good = next((tiny_data / "class_0").iterdir()).read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is a text file with a .jpg name")
    Image.new("RGB", (1, 1)).save(bad / "tiny.png")
    files = image_files(bad)
    got = dict(classify(model, info, files))
    for f in files:                      # the words prepare puts in its report.json for the same file
        assert got[str(f)] == "cannot read: " + _load_worker((str(f), info["image_size"], MAX_PIXELS, 10**9))
    assert got[str(bad / "text.jpg")] == "cannot read: not a readable image"

    with pytest.raises(UserError, match=r"text\.jpg: cannot read: not a readable image$"):
        main([best, str(bad / "text.jpg")])
    with pytest.raises(UserError, match=r"none of its 4 image files could be read"):
        main([best, str(bad)])
    (bad / "good.jpg").write_bytes(good)                  # one readable image: a result, the rest listed
    capsys.readouterr()
    main([best, str(bad)])
    out = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    assert len(out) == 5 and out[str(bad / "good.jpg")].split()[0] in info["classes"]
    assert out[str(bad / "empty.jpg")] == "cannot read: zero-byte file"
