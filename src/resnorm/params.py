"""Typed, validated parameters: `params.yaml` is read here once, before any work.

Every stage calls `load_params()`; a bad value stops the run with one line naming
the key, the value and what is allowed (`ParamError`), never a traceback deep
inside training.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NewType, get_args, get_origin, get_type_hints

import yaml

NORM_NAMES = ("bn", "in", "bin", "ln", "gn", "nn", "torch_bn")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step", "plateau")
DEVICES = ("auto", "cpu", "cuda")
SHORTCUTS = ("A", "B")
ARCHS = ("resnet6n2", "resnet18", "resnet34", "resnet50")
BLOCKS = ("basic", "preact")
INPUT_STATS = ("auto", "data", "imagenet")   # what normalizes the input images (resnorm.transfer)
# the channel counts a norm sees in each architecture (GN's group count must divide them all)
ARCH_WIDTHS = {"resnet6n2": (16, 32, 64), "resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512),
               "resnet50": (64, 128, 256, 512, 1024, 2048)}
ARCH_STAGES = {"resnet6n2": 3, "resnet18": 4, "resnet34": 4, "resnet50": 4}
FREEZE = re.compile(r"none|stem|stages:([0-9]+)|all-but-head")
LR_SCALINGS = ("none", "linear")
GROUPS = ("norms", "batch")             # which part of the study a variant belongs to
GRADCAM_SPLITS = ("val", "test")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# "auto" picks by device and batch size (train.compile_mode); the others are torch.compile's modes
EMBEDDED_ROOT = "data/raw/ifct"
MAX_SEED = 2**31 - 1                    # numpy's and torch's generators take seeds below 2^31 everywhere
MAX_IMAGE_SIZE = 1024
MAX_NEAR_DUPLICATE_BITS = 16            # of 64 dHash bits: above this, unrelated photos count as duplicates
VARIANT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")   # a file name: no path, no leading dot


OptionalPath = NewType("OptionalPath", str)   # a path, or "" (or null) for none


class ParamError(ValueError):
    """A parameter that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class SplitParams:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15


@dataclass(frozen=True)
class DataParams:
    root: str = EMBEDDED_ROOT           # class folders, or train/valid[/test] split folders
    image_size: int = 32
    split: SplitParams = field(default_factory=SplitParams)
    seed: int = 0
    min_images_per_class: int = 14
    max_image_pixels: int = 64_000_000  # larger images are refused (decompression bombs)
    near_duplicate_bits: int = 4        # dHash distance under which two photos share a split
    max_file_bytes: int = 64_000_000    # larger files are skipped unread
    follow_links: bool = False          # symbolic links that leave data.root: skipped (false) or read (true)


@dataclass(frozen=True)
class ModelParams:
    arch: str = "resnet6n2"             # resnet6n2 (He et al. 4.2) | resnet18 | resnet34 | resnet50 (torchvision's)
    n: int = 2                          # resnet6n2: 6n+2 weighted layers
    block: str = "basic"                # resnet6n2: basic | preact (norm -> ReLU -> conv, He et al. 2016)
    gn_groups: int = 4
    shortcut: str = "A"                 # resnet6n2: A identity + zero-padding (6n+2 layers); B 1x1 projection
    bin_gate_lr: float = 10.0           # BIN's rho gates learn at this multiple of the learning rate (Nam & Kim's code)
    dropout: float = 0.0                # before the classifier
    weights: OptionalPath = OptionalPath("")  # "": from scratch; else a state dict or checkpoint to start from
    freeze: str = "none"                # none | stem | stages:K | all-but-head (with weights)
    input_stats: str = "auto"           # the inputs' mean and std: auto (the weights file's, else data) | data | imagenet


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 15
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_scaling: str = "linear"          # none | linear: lr * batch_size / lr_reference_batch (Goyal et al. 2017)
    lr_reference_batch: int = 32        # the batch size at which `lr` applies as given
    schedule: str = "cosine"
    step_size: int = 5
    gamma: float = 0.1
    plateau_patience: int = 2
    warmup_epochs: int = 1
    label_smoothing: float = 0.0
    augment: bool = True
    crop_padding: int = 4
    hflip: bool = True
    cutout: int = 0                     # side in pixels of a square set to the mean (DeVries & Taylor 2017); 0: none
    color_jitter: float = 0.0           # brightness, contrast and saturation factors in [1 - s, 1 + s]; 0: none
    rotate: float = 0.0                 # degrees: a turn by an angle in [-r, r] about the centre; 0: none
    zoom: float = 0.0                   # a scale factor in [1 - z, 1 + z] about the centre; 0: none
    early_stopping_patience: int = 0    # 0 = off; else stop after this many epochs without a better val accuracy
    workers: int = 0
    threads: int = 2
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool | str = False         # false | true (= default) | auto | reduce-overhead (CUDA graphs) | max-autotune...
    head_lr: float = 0.0                # the classifier's rate at lr_reference_batch; 0: the same as lr
    data_on_device: bool = True         # CUDA: hold the uint8 train split on the GPU when it fits in a quarter of free memory


@dataclass(frozen=True)
class Variant:
    """One trained configuration: a norm at a batch size with its own train and model settings."""
    name: str
    norm: str
    batch_size: int
    train: TrainParams
    group: str = "norms"
    model: ModelParams = field(default_factory=ModelParams)

    @property
    def lr(self) -> float:
        """The base learning rate at this batch size (before warm-up and schedule)."""
        return self.scaled(self.train.lr)

    def scaled(self, lr: float) -> float:
        """A rate given at lr_reference_batch, at this variant's batch size (train.lr_scaling)."""
        t = self.train
        return lr * self.batch_size / t.lr_reference_batch if t.lr_scaling == "linear" else lr

    @property
    def head_lr(self) -> float:
        """The classifier's base rate: train.head_lr scaled like lr, or lr itself when head_lr is 0."""
        return self.scaled(self.train.head_lr) if self.train.head_lr else self.lr


@dataclass(frozen=True)
class StudyParams:
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class GradcamParams:
    classes: tuple[str, ...] = ()
    per_kind: int = 5
    split: str = "test"                 # val | test: where the examples come from (val picked the model)


@dataclass(frozen=True)
class VisualizeParams:
    images: int = 3                     # fixed images (the first of gradcam.split) whose feature maps are drawn
    channels: int = 8                   # the most active channels shown per feature map
    stat_images: int = 256              # images over which each norm layer's activation statistics are taken


@dataclass(frozen=True)
class SanityParams:
    steps: int = 30                     # float64 lock-step SGD steps of BN against nn.BatchNorm2d


@dataclass(frozen=True)
class Params:
    norm: str = "torch_bn"
    batch_size: int = 32
    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    study: StudyParams = field(default_factory=StudyParams)
    gradcam: GradcamParams = field(default_factory=GradcamParams)
    sanity: SanityParams = field(default_factory=SanityParams)
    visualize: VisualizeParams = field(default_factory=VisualizeParams)

    def experiment(self) -> Variant:
        """The single variant chosen by top-level `norm` and `batch_size` (`dvc exp run -S ...`)."""
        return Variant(f"{self.norm}-bs{self.batch_size}", self.norm, self.batch_size, self.train, model=self.model)

    def variant(self, name: str) -> Variant:
        """A study variant: its entry in `study.variants` laid over the base `train` settings."""
        if name not in self.study.variants:
            raise ParamError(f"study.variants: no variant {name!r}; known: {', '.join(self.study.variants)}")
        over = dict(self.study.variants[name])
        norm, batch_size, group = over.pop("norm"), over.pop("batch_size"), over.pop("group", "norms")
        model = {k: over.pop(k) for k in list(over) if k in MODEL_KEYS}
        return Variant(name, norm, batch_size, dataclasses.replace(self.train, **over), group,
                       dataclasses.replace(self.model, **model))

    def variants(self, group: str | None = None) -> list[Variant]:
        """Every study variant in params order, or those of one group (norms | batch)."""
        return [v for v in map(self.variant, self.study.variants) if group is None or v.group == group]


MODEL_KEYS = frozenset(f.name for f in fields(ModelParams))   # a study variant may set these too
assert not MODEL_KEYS & {f.name for f in fields(TrainParams)}, "model and train keys must not share names"


# --------------------------------------------------------------------------- loading

def _fail(key: str, value: Any, allowed: str) -> ParamError:
    return ParamError(f"params: {key} = {value!r} is not allowed: {allowed}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one scalar or tuple against its type hint; ints are accepted where floats are."""
    origin = get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, "expected a list")
        item = get_args(hint)[0]
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(key, value, "expected a mapping")
        return dict(value)
    if hint == (bool | str):            # a switch that can also name its mode (train.compile)
        if isinstance(value, bool) or (isinstance(value, str) and value):
            return value
        raise _fail(key, value, "expected true, false or a mode name")
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(key, value, "expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, value, "expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(key, value, "expected a finite number")
        return float(value)
    if hint is OptionalPath:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise _fail(key, value, "expected a path, or an empty string for none")
        return value.strip()
    if hint is str:
        if not isinstance(value, str) or not value:
            raise _fail(key, value, "expected a non-empty string")
        return value
    raise TypeError(f"unsupported type hint {hint!r} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(prefix.rstrip("."), raw, "expected a mapping")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ParamError(f"params: unknown key {prefix}{key}; allowed under {prefix.rstrip('.') or 'top level'}: "
                             f"{', '.join(sorted(known))}")
    kwargs = {}
    for name in known & raw.keys():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", raw[name], hint)
    return cls(**kwargs)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(key, value, f"one of {', '.join(choices)}")


def _check_min(key: str, value: float, low: float, inclusive: bool = True) -> None:
    if value < low or (not inclusive and value == low):
        raise _fail(key, value, f"must be {'>=' if inclusive else '>'} {low}")


def _check_range(key: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise _fail(key, value, f"must be in [{low}, {high}]")


def _check_seed(key: str, value: int) -> None:
    _check_range(key, value, 0, MAX_SEED)


def _validate_train(t: TrainParams, prefix: str, image_size: int) -> None:
    _check_min(f"{prefix}epochs", t.epochs, 1)
    _check_choice(f"{prefix}optimizer", t.optimizer, OPTIMIZERS)
    _check_min(f"{prefix}lr", t.lr, 0, inclusive=False)
    _check_choice(f"{prefix}lr_scaling", t.lr_scaling, LR_SCALINGS)
    _check_min(f"{prefix}lr_reference_batch", t.lr_reference_batch, 1)
    _check_min(f"{prefix}momentum", t.momentum, 0)
    if t.momentum >= 1:
        raise _fail(f"{prefix}momentum", t.momentum, "must be < 1")
    if t.nesterov and t.optimizer == "sgd" and t.momentum == 0:
        raise _fail(f"{prefix}nesterov", t.nesterov, "nesterov needs momentum > 0")
    _check_min(f"{prefix}weight_decay", t.weight_decay, 0)
    _check_choice(f"{prefix}schedule", t.schedule, SCHEDULES)
    _check_min(f"{prefix}step_size", t.step_size, 1)
    if not 0 < t.gamma <= 1:
        raise _fail(f"{prefix}gamma", t.gamma, "must be in (0, 1]")
    _check_min(f"{prefix}plateau_patience", t.plateau_patience, 0)
    _check_min(f"{prefix}warmup_epochs", t.warmup_epochs, 0)
    if t.warmup_epochs >= t.epochs:
        raise _fail(f"{prefix}warmup_epochs", t.warmup_epochs, f"must be < epochs ({t.epochs})")
    if not 0 <= t.label_smoothing < 1:
        raise _fail(f"{prefix}label_smoothing", t.label_smoothing, "must be in [0, 1)")
    _check_min(f"{prefix}crop_padding", t.crop_padding, 0)
    _check_range(f"{prefix}cutout", t.cutout, 0, image_size)
    if not 0 <= t.color_jitter < 1:
        raise _fail(f"{prefix}color_jitter", t.color_jitter, "must be in [0, 1)")
    if not 0 <= t.rotate <= 180:
        raise _fail(f"{prefix}rotate", t.rotate, "degrees in [0, 180]")
    if not 0 <= t.zoom < 1:
        raise _fail(f"{prefix}zoom", t.zoom, "must be in [0, 1)")
    for key in ("cutout", "color_jitter", "rotate", "zoom"):
        if getattr(t, key) and not t.augment:
            raise _fail(f"{prefix}{key}", getattr(t, key), "0 unless augment is true (augment: false turns "
                        "every augmentation off)")
    _check_min(f"{prefix}early_stopping_patience", t.early_stopping_patience, 0)
    _check_min(f"{prefix}workers", t.workers, 0)
    _check_min(f"{prefix}threads", t.threads, 1)
    _check_min(f"{prefix}head_lr", t.head_lr, 0)
    _check_choice(f"{prefix}device", t.device, DEVICES)
    _check_choice(f"{prefix}precision", t.precision, PRECISIONS)
    if isinstance(t.compile, str):
        _check_choice(f"{prefix}compile", t.compile, COMPILE_MODES)
    if t.device == "cpu" and t.precision != "fp32":
        raise _fail(f"{prefix}precision", t.precision, "fp32 on a CPU (bf16 and fp16 are for train.device: cuda)")


def _validate_model(m: ModelParams, prefix: str) -> None:
    _check_choice(f"{prefix}arch", m.arch, ARCHS)
    _check_min(f"{prefix}n", m.n, 1)
    _check_choice(f"{prefix}block", m.block, BLOCKS)
    if m.block != "basic" and m.arch != "resnet6n2":
        raise _fail(f"{prefix}block", m.block, f"basic with arch {m.arch} (preact blocks are for resnet6n2)")
    _check_min(f"{prefix}gn_groups", m.gn_groups, 1)
    widths = ARCH_WIDTHS[m.arch]
    if any(w % m.gn_groups for w in widths):
        raise _fail(f"{prefix}gn_groups", m.gn_groups,
                    f"must divide the channel counts of {m.arch}: {', '.join(map(str, widths))}")
    _check_choice(f"{prefix}shortcut", m.shortcut, SHORTCUTS)
    _check_min(f"{prefix}bin_gate_lr", m.bin_gate_lr, 0, inclusive=False)
    if not 0 <= m.dropout < 1:
        raise _fail(f"{prefix}dropout", m.dropout, "must be in [0, 1)")
    match = FREEZE.fullmatch(m.freeze)
    if not match:
        raise _fail(f"{prefix}freeze", m.freeze, "none, stem, stages:K or all-but-head")
    if match.group(1) is not None and not 1 <= int(match.group(1)) <= ARCH_STAGES[m.arch]:
        raise _fail(f"{prefix}freeze", m.freeze, f"K in 1..{ARCH_STAGES[m.arch]} ({m.arch} has "
                    f"{ARCH_STAGES[m.arch]} stages)")
    if m.freeze != "none" and not m.weights:
        raise _fail(f"{prefix}freeze", m.freeze, "none unless model.weights is set (frozen random layers learn nothing)")
    _check_choice(f"{prefix}input_stats", m.input_stats, INPUT_STATS)


def _check_variant(key: str, norm: str, batch_size: int) -> None:
    _check_choice(f"{key}norm", norm, NORM_NAMES)
    _check_min(f"{key}batch_size", batch_size, 1)


def validate(p: Params) -> Params:
    d = p.data
    if d.image_size < 4 or d.image_size % 4:
        raise _fail("data.image_size", d.image_size, "a multiple of 4, at least 4 (two stride-2 stages)")
    for name in ("train", "val", "test"):
        v = getattr(d.split, name)
        if not 0 <= v <= 1:
            raise _fail(f"data.split.{name}", v, "a fraction in [0, 1]")
    total = d.split.train + d.split.val + d.split.test
    if abs(total - 1) > 1e-6:
        raise _fail("data.split", dataclasses.asdict(d.split), f"train + val + test must sum to 1 (they sum to {total:g})")
    if d.split.train == 0 or d.split.val == 0:
        raise _fail("data.split", dataclasses.asdict(d.split), "train and val must be > 0")
    if d.image_size > MAX_IMAGE_SIZE:
        raise _fail("data.image_size", d.image_size, f"at most {MAX_IMAGE_SIZE} (the paper setting is 256)")
    _check_min("data.min_images_per_class", d.min_images_per_class, 2)
    _check_min("data.max_image_pixels", d.max_image_pixels, 1)
    _check_min("data.max_file_bytes", d.max_file_bytes, 1)
    _check_range("data.near_duplicate_bits", d.near_duplicate_bits, 0, MAX_NEAR_DUPLICATE_BITS)
    _check_seed("data.seed", d.seed)
    _validate_model(p.model, "model.")
    _validate_train(p.train, "train.", d.image_size)
    _check_variant("", p.norm, p.batch_size)
    _check_seed("seed", p.seed)
    for i, seed in enumerate(p.study.seeds):
        _check_seed(f"study.seeds[{i}]", seed)
    if not p.study.seeds:
        raise _fail("study.seeds", list(p.study.seeds), "at least one seed")
    if len(set(p.study.seeds)) != len(p.study.seeds):
        raise _fail("study.seeds", list(p.study.seeds), "seeds must be distinct")
    train_keys = {f.name for f in fields(TrainParams)}
    for name, over in p.study.variants.items():
        key = f"study.variants.{name}."
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
            raise _fail(f"study.variants.{name}", name, "a variant name is a file name: letters, digits, _ . - "
                        "and not starting with a dot (it names the run's folders)")
        if not isinstance(over, dict):
            raise _fail(key.rstrip("."), over, "a mapping with norm, batch_size and optional train and model keys")
        for k in ("norm", "batch_size"):
            if k not in over:
                raise ParamError(f"params: {key}{k} is missing; every variant names its norm and batch_size")
        for k in over:
            if k not in train_keys | MODEL_KEYS | {"norm", "batch_size", "group"}:
                raise ParamError(f"params: unknown key {key}{k}; allowed: norm, batch_size, group, "
                                 f"the train keys ({', '.join(sorted(train_keys))}) and the model keys "
                                 f"({', '.join(sorted(MODEL_KEYS))})")
        if "group" in over:
            _check_choice(f"{key}group", _coerce(f"{key}group", over["group"], str), GROUPS)
        hints = {**get_type_hints(TrainParams), **get_type_hints(ModelParams)}
        for k, v in over.items():
            if k in train_keys | MODEL_KEYS:
                _coerce(f"{key}{k}", v, hints[k])
        _coerce(f"{key}batch_size", over["batch_size"], int)
        _check_variant(key, over["norm"], over["batch_size"])
        _validate_train(p.variant(name).train, key, d.image_size)
        _validate_model(p.variant(name).model, key)
    _check_min("gradcam.per_kind", p.gradcam.per_kind, 1)
    _check_choice("gradcam.split", p.gradcam.split, GRADCAM_SPLITS)
    _check_min("sanity.steps", p.sanity.steps, 1)
    _check_range("visualize.images", p.visualize.images, 1, 16)
    _check_range("visualize.channels", p.visualize.channels, 1, 32)
    _check_min("visualize.stat_images", p.visualize.stat_images, 1)
    return p


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read, type-check and validate `params.yaml`; `overrides` is a nested dict laid on top (tests)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ParamError(f"params: {path} not found (run from the repository root)") from None
    except IsADirectoryError:
        raise ParamError(f"params: {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError as e:
        raise ParamError(f"params: {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamError(f"params: {path} is not valid YAML{where}: {problem}") from None
    if overrides:
        raw = deep_merge(raw, overrides)
    return validate(_build(Params, raw, ""))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
