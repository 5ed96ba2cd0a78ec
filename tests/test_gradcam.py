"""Grad-CAM: maps have the image's size, lie in [0, 1], and find a bright square the model learned."""
import numpy as np
import pytest
import torch
from PIL import Image

from resnorm.data import load_split, to_tensor
from resnorm.gradcam import cams, overlay
from resnorm.model import ResNet
from resnorm.params import load_params
from resnorm.prepare import prepare
from resnorm.train import load_checkpoint, run_paths, train
from conftest import write_params

SQUARE = (slice(4, 14), slice(4, 14))       # rows, cols of the square in a 32x32 image


def square_dataset(root, per_class=40):
    """Class 'square': dark noise with a bright square at a fixed place; class 'plain': dark noise only."""
    rng = np.random.default_rng(0)
    for label in ("square", "plain"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 90, (32, 32, 3)).astype(np.uint8)
            if label == "square":
                a[SQUARE] = 255
            Image.fromarray(a).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import os
    work = tmp_path_factory.mktemp("cam")
    old = os.getcwd()
    os.chdir(work)
    try:
        root = square_dataset(work / "src")
        write_params(work, {"data": {"root": str(root), "image_size": 32, "min_images_per_class": 6},
                            "model": {"n": 1}, "norm": "bn", "batch_size": 16,
                            "train": {"epochs": 4, "warmup_epochs": 0, "lr": 0.05, "threads": 2,
                                      "augment": False}})
        p = load_params()
        prepare(p.data)
        state = train(p)
        paths = run_paths(None, None)
        best = load_checkpoint(paths.best)
        model = ResNet(1, 2, norm="bn")
        model.load_state_dict(best["model"])
        model.eval()
        val = load_split("val")
        yield model, val, best, state["classes"]
    finally:
        os.chdir(old)


def test_map_peak_falls_on_the_square(trained):
    model, val, best, classes = trained
    c = classes.index("square")
    idx = np.flatnonzero(val.y == c)
    x = to_tensor(val.x[idx], best["mean"], best["std"])
    assert (model(x).argmax(1) == c).float().mean() > 0.9, "the model should have learned the square"
    maps = cams(model, x, [c] * len(idx))
    assert maps.shape == (len(idx), 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1
    hits = 0
    for m in maps:
        r, col = np.unravel_index(np.argmax(m), m.shape)
        hits += SQUARE[0].start - 2 <= r < SQUARE[0].stop + 2 and SQUARE[1].start - 2 <= col < SQUARE[1].stop + 2
    assert hits / len(maps) >= 0.8, f"peak on the square in {hits} of {len(maps)} maps"
    img = overlay(np.asarray(val.x[idx[0]]), maps[0])
    assert img.dtype == np.uint8 and img.shape[2] == 3


def test_targets_are_the_last_2n_convs():
    m = ResNet(3, 5)
    layers = m.gradcam_layers()
    assert len(layers) == 6 and all(isinstance(l, torch.nn.Conv2d) and l.out_channels == 64 for l in layers)


def test_map_stats_on_known_maps():
    from resnorm.gradcam import correlation, map_stats
    flat = np.ones((32, 32))
    s = map_stats(flat)
    assert s["top10_mass"] == pytest.approx(102 / 1024, abs=1e-3) and s["centre_mass"] == pytest.approx(0.25)
    assert s["centroid_row"] == pytest.approx(0.5) and s["centroid_col"] == pytest.approx(0.5)
    spot = np.zeros((32, 32))
    spot[2:4, 28:30] = 1                                     # top right corner
    s = map_stats(spot)
    assert s["top10_mass"] == 1.0 and s["centre_mass"] == 0.0
    assert s["centroid_row"] < 0.15 and s["centroid_col"] > 0.85
    assert map_stats(np.zeros((8, 8)))["top10_mass"] is None
    assert correlation(spot, spot) == pytest.approx(1.0) and correlation(spot, flat) is None
    assert correlation(spot, 1 - spot) == pytest.approx(-1.0)


def test_analysis_is_computed_from_the_numbers():
    from resnorm.gradcam import analysis

    def ex(kind, top, centre, r=None, pred="b"):
        e = {"kind": kind, "predicted": pred if kind == "wrong" else "a", "confidence": 0.6,
             "top10_mass": top, "centre_mass": centre}
        if kind == "wrong":
            e["true_vs_predicted_map_correlation"] = r
        return e
    index = {"split": "test", "image_size": 32, "map_resolution": 8, "classes": {"a": {
        "available": {"images": 9},
        "examples": [ex("correct", 0.2, 0.6), ex("correct", 0.22, 0.62), ex("correct", 0.21, 0.58),
                     ex("wrong", 0.4, 0.1, 0.9), ex("wrong", 0.42, 0.12, 0.8), ex("wrong", 0.41, 0.11, -0.2)]}}}
    per_class, overall = analysis(index)
    text = " ".join(overall)
    assert "8x8" in text and "within 4 pixels" in text
    assert "Correct answers draw more of their evidence from the centre" in text
    assert "Wrong answers' maps are more concentrated" in text
    assert "In 2 of them (r >= 0.5)" in text and "In 1 (r <= 0)" in text
    assert "3 correct and 3 wrong of 9 test images" in per_class["a"] and "b (3)" in per_class["a"]


def test_map_resolution_is_the_last_target_layers_output_and_leaves_the_model_alone():
    from resnorm.gradcam import map_resolution
    from resnorm.model import build_model, gradcam_layers
    m = ResNet(1, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    before = m(x)
    assert map_resolution(m, 32) == 8
    torch.testing.assert_close(m(x), before)
    r18 = build_model("resnet18", 3, "bn").eval()
    assert map_resolution(r18, 64) == 2                          # 1/32 of the input: stem /4, three stride-2 stages
    layers = gradcam_layers(r18)
    assert len(layers) == 4 and all(any(l is c for c in r18.layer4.modules()) for l in layers)
