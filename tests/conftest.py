"""Shared fixtures: tiny generated image data sets and a working folder with params.yaml."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_image(path: Path, label: int, index: int, size: int = 24, mode: str = "RGB", fmt: str = "JPEG") -> Path:
    """A distinct image per (label, index): a class-specific colour and stripe pattern plus noise."""
    rng = np.random.default_rng(label * 1000 + index)
    a = np.zeros((size, size, 3), np.uint8)
    a[...] = ((label * 80) % 256, (label * 150 + 60) % 256, (label * 40 + 120) % 256)
    if label % 2:
        a[:, ::4] = 255
    else:
        a[::4, :] = 0
    a = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(a, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return path


def make_dataset(root: Path, classes: int = 3, per_class: int = 12, size: int = 24) -> Path:
    for c in range(classes):
        for i in range(per_class):
            make_image(root / f"class_{c}" / f"img_{i:03d}.jpg", c, i, size)
    return root


def write_params(folder: Path, overrides: dict) -> Path:
    """params.yaml = the repo's defaults with `overrides` laid on top (nested)."""
    from resnorm.params import deep_merge

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = deep_merge(raw, overrides)
    if "study" in overrides and "variants" in overrides["study"]:
        raw["study"]["variants"] = overrides["study"]["variants"]
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder / "params.yaml"


TINY = {
    "data": {"image_size": 16, "min_images_per_class": 6, "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
    "model": {"n": 1},
    "train": {"epochs": 2, "warmup_epochs": 0, "lr": 0.05, "threads": 1},
    "batch_size": 8,
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder as the current directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("src") / "images")


@pytest.fixture
def prepared(workdir, tiny_data):
    """A working folder with tiny params and a prepared tiny data set."""
    from resnorm.params import load_params
    from resnorm.prepare import prepare

    write_params(workdir, {**TINY, "data": {**TINY["data"], "root": str(tiny_data)}})
    prepare(load_params().data)
    return workdir


def copy_repo(dest: Path) -> Path:
    """The pipeline files of this repo in `dest`, as a fresh git + DVC repository."""
    import subprocess
    import sys

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "weights", dest / "weights")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=dest, check=True)
    shutil.copytree(REPO / ".dvc" / "plots", dest / ".dvc" / "plots")
    subprocess.run([sys.executable, "-m", "dvc", "config", "plots.html_template", "plots/offline.html"], cwd=dest,
                   check=True)
    return dest
