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
