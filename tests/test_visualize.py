"""Stage visualize on tiny models: its files, and numbers that say what the norms do."""
from __future__ import annotations

import json

import pytest
import torch

from resnorm.model import build_model
from resnorm.params import load_params
from resnorm.train import model_config, save_checkpoint
from resnorm.visualize import MODEL, NUMBERS, OUT, Moments, activation_stats, visualize


def best_checkpoint(arch: str, norm: str, n: int = 1) -> None:
    """A models/best/best.pt as the gradcam stage leaves it, for an untrained model (weights from init)."""
    from resnorm.data import load_classes
    from resnorm.params import ModelParams
    p = load_params()
    classes = load_classes()
    m = ModelParams(arch=arch, n=n, gn_groups=4)
    torch.manual_seed(0)
    model = build_model(arch, len(classes), norm, **({"n": n} if arch == "resnet6n2" else {}), gn_groups=4)
    save_checkpoint(MODEL, {"name": "tiny-0", "model": model.state_dict(), "classes": classes,
                            "model_config": model_config(m, norm, len(classes), p.data.image_size),
                            "mean": [120.0] * 3, "std": [60.0] * 3})


@pytest.mark.parametrize("arch, norm, kernels", [("resnet6n2", "gn", (16, 3)), ("resnet6n2", "in", (16, 3)),
                                                 ("resnet18", "bn", (64, 7))])
def test_visualize_writes_its_figures_and_numbers(prepared, arch, norm, kernels):
    best_checkpoint(arch, norm)
    numbers = visualize(load_params())
    for name in ("kernels.png", "feature_maps.png", "activations.png", "augmentation.png"):
        assert (OUT / name).stat().st_size > 5000, name
    from resnorm.assignment import augmentation
    assert numbers["augmentation"] == {"settings": augmentation(load_params().train), "images": 3, "draws": 5}
    assert json.loads(NUMBERS.read_text()) == json.loads(json.dumps(numbers))
    assert (numbers["kernels"]["kernels"], numbers["kernels"]["size"][0]) == kernels
    layers = numbers["layers"]
    expected = 20 if arch == "resnet18" else 7                # every norm the forward pass reaches, in order
    assert len(layers) == expected and layers[0]["stage"] == "stem"
    assert [s["stage"] for s in numbers["stages"]] == ["stem", "stage1", "stage2", "stage3"] + \
        (["stage4"] if arch == "resnet18" else [])
    assert [f["name"] for f in numbers["feature_maps"]] == [s["stage"] for s in numbers["stages"]]
    if norm in ("gn", "in"):
        # untrained GN / IN (weight 1, bias 0) normalize every sample's groups exactly, in eval as in
        # training: zero mean and unit std after each layer, whatever came in; the fused ReLU is taken
        # off for the measurement (with it the mean would be about 0.4)
        for r in layers:
            assert abs(r["mean_after"]) < 1e-4 and r["std_after"] == pytest.approx(1, abs=1e-3), r
        assert any(abs(r["std_before"] - 1) > 0.05 for r in layers)


def test_activation_stats_leave_fused_relu_as_it_was():
    from resnorm.model import ResNet
    model = ResNet(1, 3, norm="bn").eval()
    fused = [m for m in model.modules() if getattr(m, "fused_relu", False)]
    x = torch.randn(4, 3, 16, 16)
    before = model(x)
    rows = activation_stats(model, x)
    assert len(fused) == 4 and all(m.fused_relu for m in fused)          # the stem and each block's first norm
    torch.testing.assert_close(model(x), before)
    assert len(rows) == 7 and [r["kind"] for r in rows] == ["BatchNorm"] * 7


def test_activation_stats_in_chunks_equal_one_pass_over_all_images():
    """The moments are merged chunk by chunk (so 256 images at 256 px need one chunk's activations,
    not 7.7 GiB); any chunking must give one pass's figures, and those must be torch's own float64
    mean and std of every norm layer's input."""
    from resnorm.model import ResNet
    from resnorm.visualize import norm_layers
    torch.manual_seed(0)
    model = ResNet(1, 3, norm="bn").eval()
    for m in model.modules():                  # running statistics far from (0, 1), so the chunks differ
        if hasattr(m, "running_mean"):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(10, 3, 16, 16) * 2 + 0.5
    whole = activation_stats(model, x, chunk=10)
    keys = ("mean_before", "std_before", "mean_after", "std_after")
    for chunk in (1, 3, 4):              # float32 convolutions round a little differently per batch size
        parts = activation_stats(model, x, chunk=chunk)
        assert [r["layer"] for r in parts] == [r["layer"] for r in whole]
        for a, b in zip(whole, parts):
            for k in keys:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (chunk, a["layer"], k)
    # the merge itself, exactly: pieces of unequal size and mean against the whole in float64
    t = torch.cat([torch.randn(7) * 3 + 5, torch.randn(1) - 2, torch.randn(40) * 0.1])
    merged = Moments()
    for piece in (t[:7], t[7:8], t[8:]):
        merged.add(piece)
    assert merged.n == 48 and merged.mean == pytest.approx(float(t.double().mean()), rel=1e-13)
    assert merged.std == pytest.approx(float(t.double().std(unbiased=False)), rel=1e-13)
    inputs = {}

    def keep(name):
        def hook(module, args, output):          # returns nothing: the output goes on unchanged
            inputs[name] = args[0].double()
        return hook
    hooks = [m.register_forward_hook(keep(name)) for name, m in norm_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for r in whole:
        t = inputs[r["layer"]]
        assert r["mean_before"] == pytest.approx(float(t.mean()), rel=1e-12, abs=1e-14)
        assert r["std_before"] == pytest.approx(float(t.std(unbiased=False)), rel=1e-12)


def test_visualize_without_a_best_model_is_one_line(prepared):
    from resnorm.io import UserError
    with pytest.raises(UserError, match="models/best/best.pt: no best model yet; run `dvc repro gradcam`"):
        visualize(load_params())


def test_the_figure_draws_the_augmentation_the_best_checkpoint_trained_with(prepared):
    """Not params.yaml's: a checkpoint carries its run's `train` settings, so the stage need not depend
    on every variant's entry."""
    import dataclasses
    from resnorm.train import load_checkpoint
    best_checkpoint("resnet6n2", "bn")
    ckpt = load_checkpoint(MODEL)
    ckpt["train"] = {**dataclasses.asdict(load_params().train), "cutout": 5, "color_jitter": 0.25}
    save_checkpoint(MODEL, ckpt)
    assert visualize(load_params())["augmentation"]["settings"].endswith("+ colour jitter 0.25 + cutout 5 px")


def test_augmented_views_show_what_the_training_loop_feeds_the_model(prepared):
    """Without augmentation every draw is the image as prepared; with cutout alone each draw is the image
    with one square of the train mean, and nothing else changed."""
    import numpy as np
    from dataclasses import replace
    from resnorm.data import load_split
    from resnorm.visualize import augmented_views
    x = load_split("train").x[:4]
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    t = load_params().train
    off = augmented_views(x, replace(t, augment=False), mean, std, seed=0)
    assert off.shape == (4, 6, 16, 16, 3)
    for j in range(1, 6):
        np.testing.assert_allclose(off[:, j], off[:, 0], atol=1e-6)
    cut = augmented_views(x, replace(t, augment=True, crop_padding=0, hflip=False, cutout=6), mean, std, seed=1)
    for i in range(4):
        for j in range(1, 6):
            changed = np.abs(cut[i, j] - cut[i, 0]).max(-1) > 1e-5                    # (16, 16)
            rows, cols = np.nonzero(changed)
            assert changed.any() and changed.sum() <= 36
            box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all()                                  # one square (clipped at the border), filled
            np.testing.assert_allclose(cut[i, j][changed], np.broadcast_to(mean, (changed.sum(), 3)), atol=1e-6)
    assert not np.allclose(cut[:, 1], cut[:, 2])                                    # each draw its own
