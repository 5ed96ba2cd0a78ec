"""Training one run: history/metrics fields, determinism, resume after a kill, divergence, bad params."""
import dataclasses
import json
import math
import re

import torch

import pytest

from resnorm.evaluate import evaluate
from resnorm.io import UserError, read_csv, read_json
from resnorm.kernels import cpu_kernels
from resnorm.params import load_params
from resnorm.train import HISTORY_COLUMNS, compile_mode, load_checkpoint, run_paths, train
from conftest import REPO, TINY, write_params


def test_two_epochs_write_every_field(prepared, capfd):
    p = load_params()
    state = train(p)
    epoch_lines = [line for line in capfd.readouterr().err.splitlines() if " epoch " in line and "/s" in line]
    assert len(epoch_lines) == 2 and all(len(line) < 100 for line in epoch_lines), epoch_lines
    assert state["status"] == "finished" and state["epoch"] == 2
    paths = run_paths(None, None)
    rows = read_csv(paths.history)
    assert len(rows) == 2 and list(rows[0]) == HISTORY_COLUMNS
    for row in rows:
        assert all(math.isfinite(float(row[c])) for c in HISTORY_COLUMNS)
        assert float(row["train_micro_f1"]) == pytest.approx(float(row["train_accuracy"]))
        assert float(row["val_error"]) == pytest.approx(1 - float(row["val_accuracy"]))
    m = evaluate(p)
    assert list(m) == ["run", "variant", "norm", "batch_size", "seed", "status", "epochs_trained", "best_epoch",
                       "engine", "model", "train", "val", "test"]
    ops = "fused CPU kernels" if cpu_kernels() is not None else "tensor ops"
    assert m["engine"] == {"device": "cpu", "norm_ops": ops, "threads": p.train.threads, "compile": False,
                           "torch": str(torch.__version__)}
    for split in ("train", "val", "test"):
        assert set(m[split]) == {"accuracy", "micro_f1", "macro_f1", "loss"}
        assert m[split]["micro_f1"] == pytest.approx(m[split]["accuracy"], abs=1e-6)
        assert 0 <= m[split]["macro_f1"] <= 1
    assert read_json(paths.metrics) == m
    timing = read_csv(paths.timing)                # wall times: an untracked log, one row per epoch
    assert [int(r["epoch"]) for r in timing] == [1, 2] and float(timing[0]["images_per_second"]) > 0
    assert str(paths.timing).startswith("logs/")
    assert [r["gpu_peak_gib"] for r in timing] == ["", ""]      # a GPU's peak memory; none on a CPU
    conf = read_csv(paths.plots / "confusion.csv")        # square: every (actual, predicted) pair, zeros too
    classes = read_json("data/prepared/classes.json")
    assert [(r["actual"], r["predicted"]) for r in conf] == [(a, b) for a in classes for b in classes]
    assert sum(int(r["count"]) for r in conf) == len(__import__("numpy").load("data/prepared/test_y.npy"))
    correct = sum(int(r["count"]) for r in conf if r["actual"] == r["predicted"])
    assert correct / sum(int(r["count"]) for r in conf) == pytest.approx(m["test"]["accuracy"], abs=1e-6)
    assert [r["class"] for r in read_csv(paths.plots / "per_class.csv")] == read_json("data/prepared/classes.json")
    best = load_checkpoint(paths.best)          # weights_only=True: plain tensors and containers only
    assert best["epoch"] == m["best_epoch"]


def test_same_seed_gives_identical_metrics_and_resume_equals_uninterrupted(prepared):
    write_params(prepared, {**TINY, "data": load_params().data.__dict__ | {"split": TINY["data"]["split"]},
                            "train": {**TINY["train"], "epochs": 3}})
    p = load_params()
    paths = run_paths(None, None)
    train(p)
    evaluate(p)
    first = paths.metrics.read_bytes()
    tracked = {f: f.read_bytes() for f in (paths.last, paths.best, paths.history)}
    for f in paths.models.iterdir():
        f.unlink()
    train(p)
    evaluate(p)
    assert paths.metrics.read_bytes() == first, "same params and seed must give bit-identical metrics"
    for f, data in tracked.items():     # what DVC hashes into dvc.lock: a rerun leaves it unchanged
        assert f.read_bytes() == data, f"{f} differs between two identical runs"
    for f in paths.models.iterdir():
        f.unlink()
    with pytest.raises(SystemExit):
        train(p, stop_after_epoch=1)          # the process dies after epoch 1 was saved
    assert load_checkpoint(paths.last)["epoch"] == 1
    state = train(p)                          # run again: resumes at epoch 2
    assert state["epoch"] == 3
    evaluate(p)
    assert paths.metrics.read_bytes() == first
    hist = read_csv(paths.history)
    assert [int(r["epoch"]) for r in hist] == [1, 2, 3]
    for f, data in tracked.items():     # a resumed run ends in the very files of an uninterrupted one
        assert f.read_bytes() == data, f"{f} differs after a resume"


def resume_ends_as_uninterrupted(p):
    """Train the experiment of `p` whole, then again from nothing, killed after epoch 1 and run once
    more: the resumed run must end in the very files (last.pt, best.pt, history) of the whole one.
    Returns the run's paths."""
    paths = run_paths(None, None)
    train(p)
    whole = {f: f.read_bytes() for f in (paths.last, paths.best, paths.history)}
    for f in paths.models.iterdir():
        f.unlink()
    with pytest.raises(SystemExit):
        train(p, stop_after_epoch=1)
    assert train(p)["epoch"] == p.experiment().train.epochs
    for f, data in whole.items():
        assert f.read_bytes() == data, f"{f} differs after a resume"
    return paths


def test_an_fp16_run_resumes_with_its_loss_scale(prepared, monkeypatch):
    """fp16 trains with loss scaling, and the scale is part of `last.pt`: a run killed after epoch 1 and
    run again ends in the very files of an uninterrupted one. A CPU fp16 autocast and a CPU
    GradScaler that changes its scale every 2 steps stand in for the GPU's; without the scale in the
    checkpoint the resumed run starts again at the initial scale, skips other steps, and ends elsewhere."""
    import resnorm.train as tr
    assert tr.grad_scaler(load_params(overrides={"train": {"precision": "bf16"}}).train, torch.device("cuda")) is None
    monkeypatch.setattr(tr, "autocast_for", lambda t, device: (lambda: torch.autocast("cpu", dtype=torch.float16)))
    monkeypatch.setattr(tr, "grad_scaler", lambda t, device: torch.amp.GradScaler("cpu", init_scale=2.0 ** 16,
                                                                                  growth_interval=2))
    write_params(prepared, {**TINY, "data": load_params().data.__dict__ | {"split": TINY["data"]["split"]},
                            "train": {**TINY["train"], "epochs": 3}})
    paths = resume_ends_as_uninterrupted(load_params())
    assert load_checkpoint(paths.last)["scaler"]["scale"] != 2.0 ** 16        # the scale has moved


def test_changed_params_start_over(prepared):
    p = load_params()
    with pytest.raises(SystemExit):
        train(p, stop_after_epoch=1)
    write_params(prepared, {**TINY, "data": load_params().data.__dict__ | {"split": TINY["data"]["split"]},
                            "train": {**TINY["train"], "lr": 0.01}})
    state = train(load_params())
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    # same schedule, new base lr, scaled linearly from batch 32 to the tiny batch 8
    assert state["history"][0]["lr"] == pytest.approx(0.0375 * 0.01 / 0.05 * 8 / 32)


def test_absurd_learning_rate_is_marked_diverged(prepared):
    write_params(prepared, {**TINY, "data": load_params().data.__dict__ | {"split": TINY["data"]["split"]},
                            "norm": "nn", "train": {**TINY["train"], "lr": 1e12, "schedule": "constant"}})
    p = load_params()
    state = train(p)
    assert state["status"] == "diverged"
    assert "epoch 1, step" in state["message"]
    m = evaluate(p)
    assert m["status"] == "diverged" and "train" not in m and "loss is" in m["message"]
    json.dumps(m, allow_nan=False)           # no NaN written


def test_batch_larger_than_training_set_refused(prepared):
    write_params(prepared, {**TINY, "data": load_params().data.__dict__ | {"split": TINY["data"]["split"]},
                            "batch_size": 4096})
    with pytest.raises(UserError, match="batch_size = 4096.*larger than the training set"):
        train(load_params())


@pytest.mark.parametrize("schedule", ["step", "plateau", "cosine", "constant"])
def test_schedules_and_early_stopping(prepared, schedule):
    over = {"schedule": schedule, "epochs": 4, "early_stopping_patience": 1, "step_size": 1,
            "plateau_patience": 0, "optimizer": "adam" if schedule == "plateau" else "sgd", "lr": 0.01,
            "warmup_epochs": 1}
    write_params(prepared, {**TINY, "data": load_params().data.__dict__ | {"split": TINY["data"]["split"]},
                            "train": {**TINY["train"], **over}})
    state = train(load_params())
    lrs = [h["lr"] for h in state["history"]]
    assert state["status"] in ("finished", "early_stopped")
    if state["status"] == "early_stopped":
        assert state["epoch"] < 4 and state["epoch"] - state["best_epoch"] == 1
    if schedule == "step" and len(lrs) >= 3:
        assert lrs[2] == pytest.approx(lrs[1] * 0.1)


def test_runs_read_prepares_stats_and_new_pixels_under_the_same_manifest_train_again(prepared, monkeypatch):
    """Every run normalizes with the mean and std that prepare wrote (arrays.json), not a pass of its
    own, and the arrays' digests are part of its fingerprint: when prepare's output changes while its
    manifest does not (other resizing code, another Pillow), a finished run trains again on the new
    pixels instead of calling itself "already finished" with a model of the old ones."""
    import resnorm.prepare as prep
    from resnorm.data import PREPARED, load_train_stats
    from resnorm.io import write_json
    p = load_params()
    first = train(p)
    assert (first["mean"], first["std"]) == load_train_stats()
    manifest = (PREPARED / "manifest.csv").read_bytes()
    decode = prep.load_image

    def inverted(*args, **kwargs):                 # the same files, hashes and sizes; other pixels
        pixels, *rest = decode(*args, **kwargs)
        return (255 - pixels, *rest)
    monkeypatch.setattr(prep, "load_image", inverted)
    prep.prepare(p.data)
    assert (PREPARED / "manifest.csv").read_bytes() == manifest
    again = train(load_params())
    assert again["fingerprint"] != first["fingerprint"] and again["history"] != first["history"]
    assert again["mean"] == pytest.approx([1 - m for m in first["mean"]], abs=1e-12)
    arrays = read_json(PREPARED / "arrays.json")
    arrays["train"]["mean"] = [0.25, 0.5, 0.75]
    write_json(PREPARED / "arrays.json", arrays)
    assert train(load_params())["mean"] == [0.25, 0.5, 0.75]


def test_the_start_bench_stops_each_run_at_its_first_batch(prepared):
    """bench/run_start.py (the README's seconds before a run's first batch) runs `resnorm.train` as
    `python -m` does and stops it at its first batch; a run that ends before it is an error."""
    import subprocess
    import sys
    bench = [sys.executable, str(REPO / "bench" / "run_start.py"), "--repeat", "2"]
    r = subprocess.run(bench, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "python -m resnorm.train  to its first batch" in r.stdout and "over 2 starts" in r.stdout
    assert "one channel_stats pass over train_x" in r.stdout
    assert not run_paths(None, None).last.exists()          # stopped before any epoch was saved
    train(load_params())                                     # finished: no first batch when run again
    r = subprocess.run(bench, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "ended (exit 0) before its first batch" in r.stderr


def same_aug(a: dict | None, b: dict | None) -> bool:
    """Two batches' augmentation parameters are the same: the same kinds, equal tensors."""
    return (a is None and b is None) or (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


@pytest.mark.parametrize("extra", [{}, {"cutout": 6, "color_jitter": 0.4, "rotate": 20.0, "zoom": 0.2}])
def test_workers_give_the_same_batches(prepared, extra):
    from resnorm.data import EpochBatches, batches, load_split
    split = load_split("train")
    ds = EpochBatches(split, 4, [0.5] * 3, [0.25] * 3, shuffle=True, seed=3, epoch=2, augment=True,
                      padding=2, hflip=True, **extra)
    a = list(batches(ds, 0))
    b = list(batches(ds, 2))
    assert len(a) == len(b) == len(ds)
    for (xa, ya, aa), (xb, yb, ab) in zip(a, b):
        assert (xa == xb).all() and (ya == yb).all() and same_aug(aa, ab)
    x, y = ds.to(a[0])
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    # the GPU path: the whole split held on the device, batches gathered there (here: a CPU copy)
    import numpy as np
    from resnorm.data import on_device
    held = (torch.from_numpy(np.asarray(split.x).copy()), torch.from_numpy(split.y))
    c = list(batches(ds, 0, resident=held))
    plain = [ds.resident_item(i, *held) for i in range(len(ds))]
    assert len(c) == len(a) == len(plain)
    for (xa, ya, aa), (xc, yc, ac), (xp, yp, ap) in zip(a, c, plain):
        assert torch.equal(xp, xc) and torch.equal(yp, yc) and same_aug(ap, ac)
        assert torch.equal(xa, xc) and torch.equal(ya, yc) and same_aug(aa, ac)
        torch.testing.assert_close(ds.to((xa, ya, aa))[0], ds.to((xc, yc, ac))[0], rtol=0, atol=0)
    assert on_device(split, torch.device("cpu")) is None      # on CPU the memory map is already there
    plain_ds = EpochBatches(split, 4, [0.5] * 3, [0.25] * 3, shuffle=False)
    for (xa, ya, aa), (xc, yc, ac) in zip(batches(plain_ds, 0), batches(plain_ds, 0, resident=held)):
        assert torch.equal(xa, xc) and torch.equal(ya, yc) and aa is None and ac is None


def test_crop_flip_matches_a_direct_crop():
    import numpy as np
    import torch
    from resnorm.data import crop_flip
    x = torch.arange(2 * 5 * 6 * 3, dtype=torch.uint8).reshape(2, 5, 6, 3)
    aug = torch.tensor([[0, 4, 0], [3, 1, 1]])
    out = crop_flip(x, aug, 2)
    padded = np.pad(x.numpy(), ((0, 0), (2, 2), (2, 2), (0, 0)))
    assert (out[0].numpy() == padded[0, 0:5, 4:10]).all()
    assert (out[1].numpy() == padded[1, 3:8, 1:7][:, ::-1]).all()


def test_color_jitter_matches_torchvision_image_by_image():
    """The batched jitter is torchvision's adjust_brightness, adjust_contrast and adjust_saturation, in
    that order, on each float image: factors above 1 clip, below 1 fade."""
    import torchvision.transforms.functional as F
    from resnorm.data import color_jitter
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 7, 9, 3), dtype=torch.uint8, generator=g)
    factors = torch.tensor([[1.0, 1.0, 1.0], [1.6, 0.5, 1.7], [0.4, 1.8, 0.2], [1.3, 1.3, 0.0]])
    out = color_jitter(x, factors)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for i, (b, c, sat) in enumerate(factors.tolist()):
        img = x[i].permute(2, 0, 1).float() / 255
        img = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(img, b), c), sat)
        torch.testing.assert_close(out[i], img.permute(1, 2, 0) * 255, rtol=0, atol=2e-4)
    assert torch.equal(out[0], x[0].float())                                 # factors of 1 change nothing


def test_rotation_and_zoom_match_torchvision_affine_image_by_image():
    """One grid_sample for the batch, each image with its own angle and scale, is torchvision's `affine`
    (bilinear, black fill, about the centre) on each float image, also on a non-square one."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode
    from resnorm.data import affine
    g = torch.Generator().manual_seed(0)
    for h, w in ((12, 12), (9, 14)):
        x = torch.randint(0, 256, (4, h, w, 3), dtype=torch.uint8, generator=g)
        params = torch.tensor([[0.0, 1.0], [30.0, 1.0], [-17.5, 0.8], [90.0, 1.25]])
        out = affine(x, params)
        assert out.dtype == torch.float32 and out.shape == x.shape and out.is_contiguous()
        for i, (angle, scale) in enumerate(params.tolist()):
            ref = F.affine(x[i].permute(2, 0, 1).float(), angle=angle, translate=[0, 0], scale=scale, shear=[0.0, 0.0],
                           interpolation=InterpolationMode.BILINEAR)
            torch.testing.assert_close(out[i], ref.permute(1, 2, 0), rtol=0, atol=2e-3)
        torch.testing.assert_close(out[0], x[0].float(), rtol=0, atol=1e-3)     # no turn, no zoom: the image


def test_cutout_matches_a_direct_slice():
    """Each image loses the side x side square at its centre, clipped at the border; the rest is kept."""
    from resnorm.data import cutout
    x = torch.randn(5, 3, 8, 10).contiguous(memory_format=torch.channels_last)
    centres = torch.tensor([[4, 5], [0, 0], [7, 9], [3, 1], [6, 8]])
    for side in (1, 3, 4, 8):
        out = cutout(x, centres, side)
        plain = x.clone()
        for i, (cy, cx) in enumerate(centres.tolist()):
            top, left = cy - side // 2, cx - side // 2
            plain[i, :, max(top, 0):max(top + side, 0), max(left, 0):max(left + side, 0)] = 0
        assert torch.equal(out, plain), side
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert int((cutout(x, centres[:1], 4)[0] == 0).sum()) == 3 * 4 * 4     # inside: the whole square


def test_cutout_jitter_and_affine_keep_every_crop_and_flip_and_train_resumably(prepared):
    """Turning cutout, colour jitter, rotation and zoom on draws their parameters after the crop's and flip's, so those
    stay as they were; the batches change, and a resumed run still ends as an uninterrupted one."""
    from resnorm.data import EpochBatches, load_split
    split = load_split("train")
    plain = EpochBatches(split, 4, [0.5] * 3, [0.25] * 3, shuffle=True, seed=1, epoch=3, augment=True,
                         padding=2, hflip=True)
    extra = EpochBatches(split, 4, [0.5] * 3, [0.25] * 3, shuffle=True, seed=1, epoch=3, augment=True,
                         padding=2, hflip=True, cutout=6, color_jitter=0.4, rotate=15.0, zoom=0.1)
    for i in range(len(plain)):
        a, b = plain[i], extra[i]
        assert a[2].keys() == {"crop"} and b[2].keys() == {"crop", "cutout", "jitter", "affine"}
        assert torch.equal(a[0], b[0]) and torch.equal(a[2]["crop"], b[2]["crop"])
        assert not torch.equal(plain.to(a)[0], extra.to(b)[0])
    p = load_params(overrides={"train": {"epochs": 3, "cutout": 6, "color_jitter": 0.4, "rotate": 15, "zoom": 0.1}})
    paths = resume_ends_as_uninterrupted(p)
    assert load_checkpoint(paths.best)["train"] == dataclasses.asdict(p.train)   # visualize draws from it


def test_fingerprint_covers_params_data_and_code(prepared, monkeypatch):
    import resnorm.train as tr
    p = load_params()
    v = p.experiment()
    base = tr.fingerprint(p, v, 0)
    assert tr.fingerprint(p, v, 1) != base
    assert tr.fingerprint(load_params(overrides={"train": {"lr": 0.2}}), load_params(
        overrides={"train": {"lr": 0.2}}).experiment(), 0) != base
    engine = {"device": "cpu", "norm_ops": "fused CPU kernels", "threads": 1, "compile": False, "torch": "2.14.1"}
    assert tr.fingerprint(p, v, 0, engine) != tr.fingerprint(p, v, 0, {**engine, "threads": 2}) != \
        tr.fingerprint(p, v, 0, {**engine, "norm_ops": "tensor ops"})
    monkeypatch.setattr(tr, "CODE", tr.CODE[:-1])        # as if one source file changed
    assert tr.fingerprint(p, v, 0) != base


def test_a_finished_run_without_its_best_checkpoint_is_retrained_not_called_diverged(prepared):
    p = load_params()
    first = train(p)
    paths = run_paths(None, None)
    paths.best.unlink()
    with pytest.raises(UserError, match="best.pt: missing, though .*last.pt says the run finished"):
        evaluate(p)
    again = train(p)                                  # `dvc repro` reruns train: it trains again
    assert again["status"] == "finished" and paths.best.exists()
    assert again["history"] == first["history"]
    assert evaluate(p)["status"] == "finished"


def test_bin_gates_learn_at_their_own_rate_and_the_schedule_scales_every_group():
    from resnorm.model import ResNet
    from resnorm.norms import bin_layers
    from resnorm.params import TrainParams
    from resnorm.train import make_optimizer, set_lr

    torch.manual_seed(0)
    model = ResNet(1, 3, norm="bin")
    t = TrainParams(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.5)
    opt = make_optimizer(model, t, 0.1, gate_lr=10.0)
    gates = [m.rho for m in bin_layers(model)]
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 1.0, 10.0]
    gate_group = opt.param_groups[2]
    assert [id(q) for q in gate_group["params"]] == [id(r) for r in gates] and gate_group["weight_decay"] == 0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    set_lr(opt, 0.01)                                          # what the schedule does every step
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01, pytest.approx(0.1)]
    with torch.no_grad():
        for r in gates:
            r.fill_(0.5)                                       # inside [0, 1]: no clamp in the way
    before = {id(q): q.detach().clone() for q in model.parameters()}
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 3
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for q in model.parameters():
        lr = 0.1 if any(q is r for r in gates) else 0.01
        decay = 0.5 if q.dim() > 1 else 0.0
        torch.testing.assert_close(q.detach(), before[id(q)] - lr * (q.grad + decay * before[id(q)]))


def test_a_bin_run_keeps_the_gate_rate_through_training(prepared):
    write_params(prepared, {**TINY, "data": load_params().data.__dict__ | {"split": TINY["data"]["split"]},
                            "norm": "bin", "model": {"n": 1, "bin_gate_lr": 10.0}})
    train(load_params())
    groups = load_checkpoint(run_paths(None, None).last)["optimizer"]["param_groups"]
    assert groups[2]["lr"] == pytest.approx(10 * groups[0]["lr"]) and groups[0]["lr"] > 0


def test_epoch_tally_checks_in_windows_and_names_the_first_bad_step():
    from resnorm.train import EpochTally
    tally = EpochTally(n=12, steps=6, device=torch.device("cpu"))
    losses = [1.0, 0.9, float("nan"), float("inf"), 0.5, 0.4]
    for step, value in enumerate(losses[:2]):
        tally.record_loss(step, torch.tensor(value))
        tally.add(torch.eye(3)[[0, 1]] * 5, torch.tensor([0, 2]), torch.tensor(value))
    assert tally.first_non_finite(2) is None
    for step in range(2, 6):
        tally.record_loss(step, torch.tensor(losses[step]))
    assert tally.first_non_finite(6) == 2                     # a window of 4 steps: still the exact step
    assert tally.first_non_finite(6) is None                  # each step is checked once
    assert tally.mean_loss() == pytest.approx((1.0 * 2 + 0.9 * 2) / 4)
    assert tally.accuracy() == 0.5 and tally.seen == 4
    y, p = tally.labels()
    assert list(y) == [0, 2, 0, 2] and list(p) == [0, 1, 0, 1]


def test_compiled_training_and_evaluation_track_eager(prepared):
    """train.compile runs the step and the per-epoch validation through torch.compile (static shapes);
    on CPU inductor's fused kernels match eager to rounding, not bit for bit."""
    eager = train(load_params(overrides={"train": {"epochs": 1}}))
    for f in run_paths(None, None).models.iterdir():
        f.unlink()
    state = train(load_params(overrides={"train": {"epochs": 1, "compile": "default"}}))
    a, b = eager["history"][0], state["history"][0]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
    assert state["engine"]["compile"] == "default" and state["engine"]["norm_ops"] == "tensor ops"


@pytest.mark.parametrize("setting, device, batch, mode", [
    ("auto", "cpu", 8, False), ("auto", "cuda", 8, "reduce-overhead"), ("auto", "cuda", 16, "reduce-overhead"),
    ("auto", "cuda", 32, "default"), ("auto", "cuda", 128, "default"), (True, "cuda", 8, True),
    (False, "cuda", 8, False), ("max-autotune", "cpu", 32, "max-autotune")])
def test_compile_auto_uses_cuda_graphs_at_small_batches_only(setting, device, batch, mode):
    """`train.compile: auto`: CUDA graphs where launches dominate (batch <= 16: 2.5x at batch 8 on an
    H100), inductor's default mode above, nothing on a CPU; any other setting is taken as given."""
    t = load_params(overrides={"train": {"compile": setting}}).train
    assert compile_mode(t, torch.device(device), batch) == mode


@pytest.mark.parametrize("card, setting, precision, refused", [
    (("Tesla T4", (7, 5)), "auto", "bf16", "train.precision = 'bf16': Tesla T4 has compute capability 7.5"),
    (("Tesla T4", (7, 5)), False, "bf16", "train.precision = 'bf16'"),
    (("Tesla T4", (7, 5)), "auto", "fp16", None),
    (("Tesla P100-PCIE-16GB", (6, 0)), True, "fp32", "train.compile = True: torch.compile's GPU code generator"),
    (("Tesla P100-PCIE-16GB", (6, 0)), "auto", "fp32", None),
    (("NVIDIA H100 80GB HBM3", (9, 0)), "auto", "bf16", None)])
def test_a_gpu_too_old_for_bf16_or_compile_is_refused_in_one_line(card, setting, precision, refused, monkeypatch):
    """The paper-setting command asks for bf16 and compile; free GPUs are often a T4 (7.5: no bf16, so
    Triton's bf16 kernels do not build) or a P100 (6.0: Triton builds nothing). Such a run stops
    before any work with the fix in its line; `compile: auto` compiles nothing where Triton cannot."""
    import resnorm.train as tr
    monkeypatch.setattr(tr, "gpu", lambda device: card)
    t = load_params(overrides={"train": {"compile": setting, "precision": precision, "device": "cuda"}}).train
    mode = tr.compile_mode(t, torch.device("cuda"), 32)
    assert (mode is False) == (setting is False or (setting == "auto" and card[1] < (7, 0)))
    if refused is None:
        tr.check_card(t, torch.device("cuda"), mode)
        return
    with pytest.raises(UserError, match=re.escape(refused)) as e:
        tr.check_card(t, torch.device("cuda"), mode)
    assert "\n" not in str(e.value) and "-S train." in str(e.value)


def test_evaluate_scores_val_as_validation_did_in_training(prepared, monkeypatch):
    """evaluate repeats validation's precision, memory layout and batch size, so its val figures are the
    ones that chose the best epoch. On a GPU the precision is bf16 autocast; a CPU bf16 autocast stands
    in for it here (scored in fp32, as evaluate did before, the val loss differs in the 4th digit)."""
    bf16 = lambda t, device: (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    monkeypatch.setattr("resnorm.train.autocast_for", bf16)
    monkeypatch.setattr("resnorm.evaluate.autocast_for", bf16)
    p = load_params(overrides={"train": {"epochs": 3}})
    state = train(p)
    m = evaluate(p)
    best = state["history"][m["best_epoch"] - 1]
    assert (m["val"]["accuracy"], m["val"]["macro_f1"], m["val"]["loss"]) == \
        (best["val_accuracy"], best["val_macro_f1"], best["val_loss"])
