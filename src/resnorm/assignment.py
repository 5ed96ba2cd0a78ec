"""What the assignment prescribes, knob by knob, and how a run's settings compare.

`settings(p, data)` gives the report's opening table: one row per knob with the
assignment's value, this run's value and a status:

  same        the run does what the assignment says
  differs     the run deviates from something the assignment states (marked in the report)
  not stated  the assignment leaves it open ("as appropriate", or silent): this run's choice

The README's paper-setting command must produce no "differs" row (tests/test_report.py
applies its -S overrides with DVC's own parser and checks this).
"""
from __future__ import annotations

from dataclasses import dataclass

from .params import Params, TrainParams, Variant

BIRDS = ("Cattle Egret", "Coppersmith Barbet", "Indian Peacock", "Red Wattled Lapwing", "Ruddy Shelduck",
         "White Breasted Kingfisher", "White Breasted Waterhen")
SAME, DIFFERS, OPEN = "same", "differs", "not stated"
ARCH_NAMES = {"resnet6n2": "6n+2 ResNet (He et al. 4.2)", "resnet18": "torchvision ResNet-18",
              "resnet34": "torchvision ResNet-34", "resnet50": "torchvision ResNet-50"}
ARCH_DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50}


@dataclass(frozen=True)
class Setting:
    name: str
    assignment: str
    this_run: str
    status: str


GROUP_NAMES = {"norms": "norm comparison", "batch": "batch-size study"}


def _values(variants: list[Variant], get) -> str:
    """One value if every variant agrees; else one per study group if each group agrees; else each
    distinct value with the variants that use it."""
    def distinct(vs):
        out: dict[str, list[str]] = {}
        for v in vs:
            out.setdefault(str(get(v)), []).append(v.name)
        return out
    by_value = distinct(variants)
    if len(by_value) <= 1:
        return next(iter(by_value), "n/a")
    groups = {g: distinct([v for v in variants if v.group == g]) for g in GROUP_NAMES}
    if all(len(d) <= 1 for d in groups.values()):
        return "; ".join(f"{GROUP_NAMES[g]}: {next(iter(d))}" for g, d in groups.items() if d)
    return "; ".join(f"{value} ({', '.join(names)})" for value, names in by_value.items())


def augmentation(t: TrainParams) -> str:
    """A run's training augmentation in words, in the order it is applied, e.g. "crop (pad 4) + flip +
    cutout 16 px"."""
    if not t.augment:
        return "none"
    kinds = [(True, f"crop (pad {t.crop_padding})"), (t.hflip, "flip"), (t.rotate, f"rotation ±{t.rotate:g}°"),
             (t.zoom, f"zoom ±{t.zoom:g}"), (t.color_jitter, f"colour jitter {t.color_jitter:g}"),
             (t.cutout, f"cutout {t.cutout} px")]
    return " + ".join(words for on, words in kinds if on)


def _row(name: str, assignment: str, this_run: str, ok: bool | None) -> Setting:
    return Setting(name, assignment, this_run, OPEN if ok is None else SAME if ok else DIFFERS)


def settings(p: Params, data: dict) -> list[Setting]:
    """The table for params `p` and the prepared data's report (data/prepared/report.json)."""
    every = p.variants()
    norms, batch = p.variants("norms"), p.variants("batch")
    study = norms + batch
    t = [v.train for v in study] or [p.train]
    m = [v.model for v in study] or [p.model]
    study_or_experiment = study or [p.experiment()]
    ours = all(x.arch == "resnet6n2" for x in m)
    images = data["images"]
    stop = lambda v: f"after {v.train.early_stopping_patience} epochs without a better val accuracy" \
        if v.train.early_stopping_patience else "none"
    batch_grid = {(v.norm, v.batch_size) for v in batch}
    rows = [
        _row("data set", "Indian birds: 25 species, 30,000 train / 7,500 val images",
             f"{data['root']} ({data['layout']}): {data['classes']} classes, {images['train']:,} train / "
             f"{images['val']:,} val / {images['test']:,} test",
             data["classes"] == 25 and data["layout"] == "given splits"),
        _row("test split", "scores asked for, split not supplied",
             f"{images['test']:,} images held out by class (seed {p.data.seed}), never used to select", None),
        _row("image size", "256x256", f"{p.data.image_size}x{p.data.image_size}", p.data.image_size == 256),
        _row("architecture", "the 6n+2 ResNet of He et al. 4.2 (16/32/64 filters)",
             _values(study_or_experiment, lambda v: ARCH_NAMES[v.model.arch]), ours),
        _row("depth", "6n+2 with n = 2",
             _values(study_or_experiment, lambda v: f"6n+2 with n = {v.model.n} ({6 * v.model.n + 2} layers)"
                     if v.model.arch == "resnet6n2" else f"{ARCH_DEPTH[v.model.arch]} layers"),
             ours and all(x.n == 2 for x in m)),
        _row("residual block", "basic: conv, norm, ReLU, conv, norm, addition, ReLU",
             _values(study_or_experiment, lambda v: "pre-activation (norm, ReLU, conv, twice, then the addition)"
                     if v.model.block == "preact" else "basic"), all(x.block == "basic" for x in m)),
        _row("shortcut", "identity, stride-2 subsampling, zero-padded channels (He et al. 4.2, option A)",
             _values(study_or_experiment, lambda v: "1x1 projection conv + norm (torchvision)" if v.model.arch != "resnet6n2"
                     else {"A": "option A (identity, zero-padded)",
                           "B": "option B (1x1 projection conv" + (")" if v.model.block == "preact" else " + norm)")
                           }[v.model.shortcut]),
             ours and all(x.shortcut == "A" for x in m)),
        _row("dropout", "none", _values(study_or_experiment, lambda v: f"{v.model.dropout:g} before the classifier"
                                        if v.model.dropout else "none"), all(x.dropout == 0 for x in m)),
        _row("initialisation", "from scratch",
             _values(study_or_experiment, lambda v: f"weights {v.model.weights}, freeze {v.model.freeze}"
                     if v.model.weights else "from scratch (Kaiming normal)"), not any(x.weights for x in m)),
        _row("GN groups", "not stated (Wu & He: 32; 16 channels allow at most 16)",
             _values(study_or_experiment, lambda v: v.model.gn_groups), None),
        _row("BIN gate learning rate", "not stated (Nam & Kim's code: 10x)",
             _values(study_or_experiment, lambda v: f"{v.model.bin_gate_lr:g}x"), None),
        _row("optimizer", "SGD", _values(study, lambda v: v.train.optimizer.upper()),
             all(x.optimizer == "sgd" for x in t)),
        _row("momentum", "not stated", _values(study, lambda v: v.train.momentum), None),
        _row("Nesterov", "no (plain SGD)", _values(study, lambda v: "yes" if v.train.nesterov else "no"),
             not any(x.nesterov for x in t)),
        _row("learning rate", "1e-4 at batch 32",
             _values(study, lambda v: f"{v.train.lr:g} at batch {v.train.lr_reference_batch}"),
             all(x.lr == 1e-4 and (x.lr_reference_batch == 32 or x.lr_scaling == "none") for x in t)),
        _row("learning rate vs batch size", "not stated",
             _values(study, lambda v: v.train.lr_scaling) + (
                 " (" + ", ".join(f"batch {b}: {lr:g}" for b, lr in sorted({(v.batch_size, v.lr) for v in study}))
                 + ")" if study else ""), None),
        _row("schedule", "decay or schedule as appropriate", _values(study, lambda v: v.train.schedule), None),
        _row("warm-up", "none", _values(study, lambda v: f"{v.train.warmup_epochs} epoch(s)"),
             all(x.warmup_epochs == 0 for x in t)),
        _row("weight decay", "none", _values(study, lambda v: f"{v.train.weight_decay:g}"),
             all(x.weight_decay == 0 for x in t)),
        _row("label smoothing", "none", _values(study, lambda v: f"{v.train.label_smoothing:g}"),
             all(x.label_smoothing == 0 for x in t)),
        _row("augmentation", "none",
             _values(study, lambda v: augmentation(v.train)), not any(x.augment for x in t)),
        _row("epochs", "50", _values(study, lambda v: v.train.epochs), all(x.epochs == 50 for x in t)),
        _row("norm comparison: batch size", "32", _values(norms, lambda v: v.batch_size),
             bool(norms) and all(v.batch_size == 32 for v in norms)),
        _row("norm comparison: early stopping", "none (50 epochs)", _values(norms, stop),
             all(v.train.early_stopping_patience == 0 for v in norms)),
        _row("batch-size study", "BN and GN at batch 8 and 128, early stopping on val accuracy",
             ", ".join(f"{n} at {', '.join(str(b) for b in sorted(b for m, b in batch_grid if m == n))}"
                       for n in sorted({m for m, _ in batch_grid})) + "; early stopping " + _values(batch, stop)
             if batch else "not run",
             {("bn", 8), ("bn", 128), ("gn", 8), ("gn", 128)} <= batch_grid
             and all(v.train.early_stopping_patience > 0 for v in batch)),
        _row("seeds", "not stated (one run each)", f"{len(p.study.seeds)} per variant ({len(every)} variants)", None),
        _row("precision", "not stated", _values(study, lambda v: v.train.precision), None),
        _row("Grad-CAM split", "validation", {"val": "validation", "test": "test"}[p.gradcam.split],
             p.gradcam.split == "val"),
        _row("Grad-CAM classes", ", ".join(BIRDS), ", ".join(p.gradcam.classes), set(p.gradcam.classes) == set(BIRDS)),
        _row("Grad-CAM examples", "5 correct and 5 wrong per class", f"up to {p.gradcam.per_kind} of each",
             p.gradcam.per_kind == 5),
    ]
    return rows
