"""Stage `train`: one variant (a norm at a batch size) with one seed, resumable.

  python -m resnorm.train                          # the experiment: top-level norm / batch_size / seed
  python -m resnorm.train --variant gn-bs8 --seed 1  # one run of the study

Every epoch writes, atomically, `last.pt` (model, optimizer, schedule state,
RNG state, history) and `best.pt` (best validation accuracy) plus the history
CSV. A killed run started again with the same parameters resumes after its
last completed epoch and ends with the same numbers as an uninterrupted run.
The test split is never read here.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .data import ARRAYS, EpochBatches, batches, load_classes, load_split, load_train_stats, on_device, PREPARED
from .io import UserError, append_csv, atomic_path, console, run_cli, write_csv
from .metrics import predict, scores
from .kernels import engine
from .model import model_from_config
from .norms import bin_layers, clamp_gates_
from .params import ModelParams, Params, TrainParams, Variant, load_params
from .transfer import FROM_DATA, HEAD, describe, file_sha1, freeze, input_stats, keep_frozen_norms, load_weights

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_error", "train_accuracy", "train_micro_f1",
                   "train_macro_f1", "val_loss", "val_error", "val_accuracy", "val_micro_f1", "val_macro_f1"]
# Wall-clock figures change with every run, so they stay out of everything git or DVC tracks
# (a rerun with identical results leaves `git status` and dvc.lock clean); they go to an
# untracked log, logs/timing/<run>.csv, one row per epoch.
TIMING_COLUMNS = ["epoch", "epoch_seconds", "train_seconds", "images_per_second", "finished_at", "gpu_peak_gib"]


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where one run keeps its checkpoints, history, evaluation outputs and (untracked) epoch times."""
    name: str
    models: Path
    history: Path
    metrics: Path
    timing: Path
    plots: Path

    @property
    def last(self) -> Path:
        return self.models / "last.pt"

    @property
    def best(self) -> Path:
        return self.models / "best.pt"


def run_paths(variant: str | None, seed: int | None) -> RunPaths:
    if variant is None:
        return RunPaths("experiment", Path("models/experiment"), Path("plots/experiment/history.csv"),
                        Path("metrics/experiment.json"), Path("logs/timing/experiment.csv"), Path("plots/experiment"))
    name = f"{variant}-{seed}"
    return RunPaths(name, Path("models/study") / name, Path("plots/study") / name / "history.csv",
                    Path("metrics/study") / f"{name}.json", Path("logs/timing") / f"{name}.csv",
                    Path("plots/study") / name)


def select(p: Params, variant: str | None) -> Variant:
    return p.experiment() if variant is None else p.variant(variant)


class Diverged(RuntimeError):
    pass


# --------------------------------------------------------------------------- building blocks

def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is available; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def model_config(m: ModelParams, norm: str, num_classes: int, image_size: int) -> dict:
    """What rebuilds the model without params.yaml (`model.model_from_config`): the architecture,
    its arguments, and the input size it was trained at."""
    config = {"arch": m.arch, "num_classes": num_classes, "norm": norm, "gn_groups": m.gn_groups,
              "dropout": m.dropout}
    if m.arch == "resnet6n2":
        config.update(n=m.n, shortcut=m.shortcut, block=m.block)
    return {**config, "image_size": image_size}


def make_model(m: ModelParams, norm: str, num_classes: int) -> nn.Module:
    """The model `model.*` describes, with norm `norm`, freshly initialised (weights: `prepare_model`)."""
    return model_from_config(model_config(m, norm, num_classes, image_size=0))


def prepare_model(m: ModelParams, norm: str, num_classes: int) -> tuple[nn.Module, dict | None]:
    """`make_model`, then, with `model.weights`, the file's weights and the freezing; returns the
    model and what was loaded and frozen (None when trained from scratch)."""
    model = make_model(m, norm, num_classes)
    if not m.weights:
        return model, None
    report = load_weights(model, m.weights, m.arch)
    report.update(freeze(model, m))
    return model, report


def make_optimizer(model: nn.Module, t: TrainParams, lr: float | None = None,
                   gate_lr: float = 1.0, head_lr: float | None = None) -> torch.optim.Optimizer:
    """SGD (or Adam) over parameter groups, each with an `lr_scale` that the schedule multiplies:
    conv/linear weights (weight decay), 1-d parameters (norm affines, biases; no decay, as is
    standard) and BIN's rho gates (no decay, `gate_lr` times the rate, as in Nam & Kim's code).
    With `head_lr` (another rate than `lr`), the classifier's weight and bias get groups of their
    own at `head_lr`. Frozen parameters (requires_grad False) are left out."""
    lr = t.lr if lr is None else lr
    gates = {id(m.rho) for m in bin_layers(model)}
    split_head = head_lr is not None and head_lr != lr
    head = {id(q) for k, q in model.named_parameters() if k.startswith(HEAD)} if split_head else set()
    params = [q for q in model.parameters() if q.requires_grad and id(q) not in head]
    decay = [q for q in params if q.dim() > 1]
    rest = [q for q in params if q.dim() <= 1 and id(q) not in gates]
    groups = [{"params": decay, "weight_decay": t.weight_decay, "lr_scale": 1.0},
              {"params": rest, "weight_decay": 0.0, "lr_scale": 1.0}]
    if gates:
        groups.append({"params": [m.rho for m in bin_layers(model) if m.rho.requires_grad], "weight_decay": 0.0,
                       "lr_scale": gate_lr})
    if split_head:
        fc = [q for k, q in model.named_parameters() if k.startswith(HEAD)]
        groups += [{"params": [q for q in fc if q.dim() > 1], "weight_decay": t.weight_decay, "lr_scale": head_lr / lr},
                   {"params": [q for q in fc if q.dim() <= 1], "weight_decay": 0.0, "lr_scale": head_lr / lr}]
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=t.momentum, nesterov=t.nesterov)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled rate into every parameter group, times that group's `lr_scale`."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class Schedule:
    """Learning rate as a function of (epoch, step), plus reduce-on-plateau state; checkpointable.

    `lr` is the base rate (the variant's, after any batch-size scaling; default `t.lr`)."""

    def __init__(self, t: TrainParams, steps_per_epoch: int, lr: float | None = None):
        self.t, self.steps, self.base = t, steps_per_epoch, t.lr if lr is None else lr
        self.plateau_factor, self.plateau_best, self.plateau_bad = 1.0, -math.inf, 0

    def lr(self, epoch: int, step: int) -> float:
        t, base = self.t, self.base
        if epoch < t.warmup_epochs:
            return base * (epoch * self.steps + step + 1) / (t.warmup_epochs * self.steps)
        e = epoch - t.warmup_epochs
        if t.schedule == "cosine":
            span = max(t.epochs - t.warmup_epochs, 1)
            return base * 0.5 * (1 + math.cos(math.pi * (e * self.steps + step) / (span * self.steps)))
        if t.schedule == "step":
            return base * t.gamma ** (e // t.step_size)
        if t.schedule == "plateau":
            return base * self.plateau_factor
        return base

    def end_epoch(self, val_accuracy: float) -> None:
        if self.t.schedule != "plateau":
            return
        if val_accuracy > self.plateau_best:
            self.plateau_best, self.plateau_bad = val_accuracy, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.t.plateau_patience:
                self.plateau_factor *= self.t.gamma
                self.plateau_bad = 0

    def state_dict(self) -> dict:
        return {"factor": self.plateau_factor, "best": self.plateau_best, "bad": self.plateau_bad}

    def load_state_dict(self, s: dict) -> None:
        self.plateau_factor, self.plateau_best, self.plateau_bad = s["factor"], s["best"], s["bad"]


CODE = ("train.py", "model.py", "norms.py", "kernels.py", "kernels.cpp", "data.py", "metrics.py", "params.py",
        "transfer.py")


def fingerprint(p: Params, v: Variant, seed: int, run_engine: dict | None = None) -> str:
    """Identity of a run: a checkpoint is reused or resumed only if this matches.

    It covers the settings, the data (the manifest, and `arrays.json`: every array's sha1 and the
    train split's mean and std), the starting weights' content, the training code
    and the engine (device, fused kernels or tensor ops, threads, compile mode, torch version:
    `kernels.engine`), so a change to any of them starts the run over instead of picking up a
    stale checkpoint or finishing a run on other arithmetic than it started with.
    """
    data = [PREPARED / "manifest.csv", PREPARED / ARRAYS]
    data_hash = hashlib.sha1(b"".join(f.read_bytes() for f in data if f.exists())).hexdigest()
    here = Path(__file__).parent
    code_hash = hashlib.sha1(b"".join((here / f).read_bytes() for f in CODE)).hexdigest()
    weights = v.model.weights
    blob = json.dumps({"variant": dataclasses.asdict(v), "image_size": p.data.image_size, "seed": seed,
                       "data": data_hash, "code": code_hash, "engine": run_engine,
                       "weights": file_sha1(weights) if weights and Path(weights).is_file() else None},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save through a file object: given a path, torch names the zip's root folder after the
    (random) temp file, so equal checkpoints would differ in bytes and in dvc.lock."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(_canonical(state), f)
    except RuntimeError as e:            # torch's writer: "[enforce fail at inline_container.cc] ... file write failed"
        raise UserError(f"{path}: could not write the checkpoint (disk full?): {str(e).splitlines()[0][:160]}; "
                        "the previous checkpoint is kept") from None


def _canonical(obj):
    """The same content as the same pickle: pickle writes a string once per object, so equal
    strings that are distinct objects (read back from a resumed checkpoint vs literals) would
    change the bytes. Interning makes every equal string one object."""
    if isinstance(obj, dict):
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    if isinstance(obj, str):
        return sys.intern(obj)
    return obj


def load_checkpoint(path: Path) -> dict:
    """A checkpoint of this project, or one line naming the file when it is torn, foreign or not a
    checkpoint (the fix: delete it and train again)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint; run `dvc repro` to train it") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first}); delete it and run "
                        "`dvc repro` to train again") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path}: not a checkpoint of this project; delete it and run `dvc repro` to train again")
    return state


def configure(t: TrainParams, device: torch.device) -> None:
    """Bit-reproducible on CPU; on CUDA, speed first (cuDNN autotuning), as the paper setting needs."""
    torch.set_num_threads(t.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True)


SMALL_BATCH = 16      # train.compile: auto uses CUDA graphs at or below this batch size
TRITON_MIN = (7, 0)   # torch.compile's GPU code generator (Triton) builds nothing for older cards (P100)
BF16_MIN = (8, 0)     # bf16 arithmetic: Ampere (A100, RTX 30xx) and later


def gpu(device: torch.device) -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of a CUDA device; None for any other device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)


def check_card(t: TrainParams, device: torch.device, mode: bool | str) -> None:
    """Refuse in one line, before any work, what this GPU cannot run. The paper-setting command asks
    for bf16 and compile, and free GPUs are often older: on a T4 (7.5) Triton's bf16 kernels do not
    build ("Feature '.bf16' requires .target sm_80 or higher", pages of it, after each run's start:
    pytorch-lightning#18070, nanoGPT#525), and eager bf16 would run emulated, without the speed
    it is chosen for; on a P100 (6.0) Triton builds nothing at all."""
    card = gpu(device)
    if card is None:
        return
    name, capability = card
    has = f"{name} has compute capability {capability[0]}.{capability[1]}"
    if mode and capability < TRITON_MIN:
        raise UserError(f"train.compile = {t.compile!r}: torch.compile's GPU code generator (Triton) needs "
                        f"compute capability 7.0 or newer, and {has}; use -S train.compile=auto (no compile "
                        f"on this card) or false")
    if t.precision == "bf16" and capability < BF16_MIN:
        raise UserError(f"train.precision = 'bf16': {has}, and bf16 arithmetic needs 8.0 or newer (A100, RTX 30xx, "
                        f"H100); use -S train.precision=fp16 (loss-scaled) or fp32")


def compile_mode(t: TrainParams, device: torch.device, batch_size: int) -> bool | str:
    """What `train.compile` means for this run: False, True (inductor's default mode) or a mode name.

    `auto`: nothing on a CPU, or on a GPU that Triton cannot compile for (compute capability under
    7.0); on CUDA, CUDA graphs (`reduce-overhead`) at batch <= 16, where
    launching kernels costs more than running them, and the default mode above. Measured on one
    H100 with `resnorm.train` (bn, 256 px, bf16): at batch 8, 2,749 images/s with CUDA graphs
    against 1,081 without; at batch 32 and 128 the default mode already matches the bench loop.
    """
    if t.compile != "auto":
        return t.compile
    card = gpu(device)
    if device.type != "cuda" or (card and card[1] < TRITON_MIN):
        return False
    return "reduce-overhead" if batch_size <= SMALL_BATCH else "default"


def compiled(model: nn.Module, mode: bool | str) -> nn.Module:
    """`torch.compile` in `mode` (from `compile_mode`; False: the model itself).

    Static shapes (`dynamic=False`): a run has one batch size, so it compiles at most four
    graphs (train and eval, full and last batch) instead of a slower shape-generic one.
    `reduce-overhead` adds CUDA graphs, which pay off at small batches, where launching
    kernels costs more than running them. Inductor caches what it compiles on disk
    (/tmp/torchinductor_$USER by default, `TORCHINDUCTOR_CACHE_DIR` to move it), so the
    second stage on a machine compiles the same graphs from that cache, not from scratch.
    """
    if mode is False:
        return model
    return torch.compile(model, mode=None if mode in (True, "default") else mode, dynamic=False)


def eval_batch_size(batch_size: int) -> int:
    """The batch of validation, and of `evaluate`, which repeats it: the run's own, at least 64."""
    return max(batch_size, 64)


def autocast_for(t: TrainParams, device: torch.device):
    if device.type != "cuda" or t.precision == "fp32":
        return None
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def grad_scaler(t: TrainParams, device: torch.device) -> torch.amp.GradScaler | None:
    """Loss scaling for fp16, whose range is too small for small gradients (bf16 has fp32's range and
    needs none). Its scale goes into `last.pt`: a resumed run goes on with the scale it had, instead
    of starting again at 65,536 and skipping steps until it has found it again."""
    return torch.amp.GradScaler(device.type) if autocast_for(t, device) and t.precision == "fp16" else None


# --------------------------------------------------------------------------- the loop

SYNC_EVERY = 50      # on a GPU the loop waits for the device only every this many steps (and at epoch end)


class EpochTally:
    """One epoch's loss sum, correct count, predictions and targets, kept on the training device.

    The loop then never waits for the GPU inside an epoch except at the checks it chooses
    (`first_non_finite`, every SYNC_EVERY steps on CUDA, every step on CPU). The loss sum is
    accumulated in float64 in step order, so it equals the old `loss.item() * len(y)` sum bit
    for bit, and the per-step losses are kept so a divergence still names its exact step.
    """

    def __init__(self, n: int, steps: int, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.preds = torch.empty(n, dtype=torch.long, device=device)
        self.targets = torch.empty(n, dtype=torch.long, device=device)
        self.losses = torch.empty(steps, dtype=torch.float32, device=device)
        self.seen = self.checked = self.pending = 0

    def record_loss(self, step: int, loss: torch.Tensor) -> None:
        self.losses[step] = loss.detach()

    def first_non_finite(self, upto: int) -> int | None:
        """The first step below `upto`, not checked before, whose loss is not finite (one host sync)."""
        start, self.checked = self.checked, upto
        bad = torch.nonzero(~torch.isfinite(self.losses[start:upto]))
        return start + int(bad[0, 0]) if len(bad) else None

    def loss_at(self, step: int) -> float:
        return float(self.losses[step])

    def add(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        n = len(y)
        pred = logits.detach().argmax(1)
        self.loss_sum += loss.detach().double() * n
        self.correct += (pred == y).sum()
        self.preds[self.seen:self.seen + n] = pred
        self.targets[self.seen:self.seen + n] = y
        self.seen += n
        self.pending += 1

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(self.seen, 1)

    def accuracy(self) -> float:
        return int(self.correct) / max(self.seen, 1)

    def labels(self):
        """(targets, predictions) of the epoch as numpy arrays (one transfer)."""
        return self.targets[:self.seen].cpu().numpy(), self.preds[:self.seen].cpu().numpy()


class Progress:
    """A rich bar on a terminal; on a pipe (CI, dvc queue) just the per-epoch lines."""

    def __init__(self, name: str, steps: int, epoch: int, epochs: int):
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
            self.bar = RichProgress(TextColumn(f"{name} epoch {epoch + 1}/{epochs}"), BarColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                    console=console, transient=True)
            self.task = self.bar.add_task("", total=steps, info="")
            self.bar.start()

    @property
    def active(self) -> bool:
        return self.bar is not None

    def update(self, info: str, advance: int = 1) -> None:
        if self.bar:
            self.bar.update(self.task, advance=advance, info=info)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def train(p: Params, variant: str | None = None, seed: int | None = None,
          stop_after_epoch: int | None = None) -> dict:
    """Train one run to completion (or resume it); returns its final checkpoint state.

    `stop_after_epoch` ends the process right after that epoch is saved (tests: a simulated kill).
    """
    v = select(p, variant)
    seed = p.seed if seed is None else seed
    paths = run_paths(variant, seed)
    t = v.train
    device = pick_device(t.device)
    configure(t, device)
    classes = load_classes()
    if variant is not None:               # a study run: gradcam will need these classes, so say it now, not hours later
        unknown = [c for c in p.gradcam.classes if c not in classes]
        if unknown:
            raise UserError(f"gradcam.classes: {', '.join(map(repr, unknown))} not in the prepared data set; "
                            f"known: {', '.join(classes)}")
    train_split, val_split = load_split("train"), load_split("val")
    if v.batch_size > len(train_split):
        raise UserError(f"batch_size = {v.batch_size} (variant {v.name}) is larger than the training set "
                        f"({len(train_split)} images); use at most {len(train_split)}")
    if device.type == "cpu" and t.precision != "fp32":
        raise UserError(f"train.precision = {t.precision!r} on a CPU: use fp32 (bf16 and fp16 are for CUDA)")
    mode = compile_mode(t, device, v.batch_size)
    check_card(t, device, mode)
    run_engine = engine(device, t.threads, mode)
    fp = fingerprint(p, v, seed, run_engine)

    torch.manual_seed(seed)
    model, transfer = prepare_model(v.model, v.norm, len(classes))
    if transfer:
        console.print(f"{paths.name}: {describe(transfer)}; freeze {transfer['freeze']}: "
                      f"{transfer['trainable_parameters']:,} of "
                      f"{transfer['trainable_parameters'] + transfer['frozen_parameters']:,} parameters train",
                      soft_wrap=True, markup=False)
    model = model.to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, t, v.lr, v.model.bin_gate_lr, v.head_lr)
    steps = len(EpochBatches(train_split, v.batch_size, None, None, shuffle=True))
    schedule = Schedule(t, steps, v.lr)
    scaler = grad_scaler(t, device)
    state = {"fingerprint": fp, "name": paths.name, "variant": v.name, "norm": v.norm,
             "batch_size": v.batch_size, "model_config": model_config(v.model, v.norm, len(classes), p.data.image_size),
             "seed": seed, "classes": classes, "epoch": 0, "history": [],
             "best_epoch": 0, "best_val_accuracy": -1.0, "bad_epochs": 0, "status": "running",
             "message": "", "mean": None, "std": None, "engine": run_engine,
             "train": dataclasses.asdict(t)}     # what it trained with, e.g. the augmentation `visualize` draws
    if transfer:                          # only then, so runs from scratch keep their checkpoints as they were
        state["transfer"] = transfer

    if paths.last.exists():
        try:
            old = load_checkpoint(paths.last)
        except UserError:        # a torn or foreign file: start over rather than crash
            console.print(f"[yellow]warning:[/yellow] {paths.last} is unreadable or not a checkpoint; starting over")
            old = None
        if old and old.get("fingerprint") == fp and old["status"] in ("finished", "early_stopped") \
                and not paths.best.exists():
            console.print(f"{paths.name}: {old['status']}, but {paths.best} is missing; training again")
            old = None
        if old and old.get("fingerprint") == fp:
            if old["status"] != "running":
                console.print(f"{paths.name}: already {old['status']} at epoch {old['epoch']}; nothing to do")
                write_history(paths.history, old["history"])
                return old
            model.load_state_dict(old["model"])
            optimizer.load_state_dict(old["optimizer"])
            schedule.load_state_dict(old["schedule"])
            if scaler and "scaler" in old:
                scaler.load_state_dict(old["scaler"])
            torch.set_rng_state(old["rng"])
            state.update({k: old[k] for k in state if k in old})
            console.print(f"{paths.name}: resuming after epoch {state['epoch']}")
        elif old:
            console.print(f"{paths.name}: parameters, data, code or engine changed since the last checkpoint; "
                          "starting over")
    if state["epoch"] == 0:
        state["mean"], state["std"], source = input_stats(v.model.input_stats, transfer, load_train_stats)
        if state.get("transfer"):                        # the record says what was used, not what the file had
            state["transfer"]["input_stats"] = {"mean": state["mean"], "std": state["std"], "from": source}
        if source != FROM_DATA:           # the usual case goes without saying
            console.print(f"{paths.name}: inputs normalized with the mean and std of {source}", markup=False)
        paths.best.unlink(missing_ok=True)
        paths.timing.unlink(missing_ok=True)
    mean, std = state["mean"], state["std"]
    autocast = autocast_for(t, device)
    step_model = compiled(model, mode)
    graphs = mode == "reduce-overhead" and device.type == "cuda"
    gates = bin_layers(model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    pin = device.type == "cuda"
    resident = on_device(train_split, device) if t.data_on_device else None
    resident_val = on_device(val_split, device) if resident is not None else None
    if resident is not None:
        console.print(f"{paths.name}: the train split ({train_split.x.nbytes / 2**30:.1f} GiB uint8) is held on "
                      f"{device}; batches are gathered there")
    if state["epoch"] < t.epochs:
        console.print(f"{paths.name}: one line per epoch: lr, train loss and accuracy, val loss, accuracy and "
                      f"macro-F1, wall seconds, train images/s; * marks a new best val accuracy", soft_wrap=True)
    start_all = time.perf_counter()

    try:
        for epoch in range(state["epoch"], t.epochs):
            model.train()
            keep_frozen_norms(model)
            ds = EpochBatches.training(train_split, v.batch_size, mean, std, t, seed=seed, epoch=epoch)
            bar = Progress(paths.name, len(ds), epoch, t.epochs)
            t0 = time.perf_counter()
            tally = EpochTally(len(train_split), len(ds), device)
            every = 1 if device.type == "cpu" else SYNC_EVERY
            lr = t.lr
            try:
                for step, batch in enumerate(batches(ds, t.workers, pin, resident)):
                    x, y = ds.to(batch, device, t.channels_last)
                    lr = schedule.lr(epoch, step)
                    set_lr(optimizer, lr)
                    if graphs:                    # a new training step: CUDA graph outputs of the last one may be reused
                        torch.compiler.cudagraph_mark_step_begin()
                    with (autocast() if autocast else contextlib.nullcontext()):
                        logits = step_model(x)
                        loss = loss_fn(logits.float(), y)
                    tally.record_loss(step, loss)
                    if (step + 1) % every == 0 or step + 1 == len(ds):      # the only host syncs of the epoch
                        bad = tally.first_non_finite(step + 1)
                        if bad is not None:
                            raise Diverged(f"loss is {tally.loss_at(bad)} at epoch {epoch + 1}, step {bad + 1} "
                                           f"(lr {schedule.lr(epoch, bad):.3g}); lower train.lr")
                        if bar.active:
                            bar.update(f"loss {tally.mean_loss():.3f}  acc {tally.accuracy():.3f}  "
                                       f"{tally.seen / max(time.perf_counter() - t0, 1e-9):.0f} img/s", tally.pending)
                            tally.pending = 0
                    optimizer.zero_grad(set_to_none=True)
                    if scaler:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    clamp_gates_(gates)
                    tally.add(logits, y, loss)
            finally:
                bar.close()
            seen = tally.seen
            train_time = time.perf_counter() - t0
            tr = scores(*tally.labels(), len(classes))
            val_loss, val_pred, _ = predict(step_model, val_split, mean, std, eval_batch_size(v.batch_size), device,
                                            autocast, t.channels_last, resident_val)
            va = scores(val_split.y, val_pred, len(classes))
            if not math.isfinite(val_loss):
                raise Diverged(f"validation loss is {val_loss} after epoch {epoch + 1}; lower train.lr")
            schedule.end_epoch(va["accuracy"])
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": tally.mean_loss(),
                   "train_error": 1 - tr["accuracy"], **{f"train_{k}": x for k, x in tr.items()},
                   "val_loss": val_loss, "val_error": 1 - va["accuracy"], **{f"val_{k}": x for k, x in va.items()}}
            state["history"].append({k: (round(x, 6) if isinstance(x, float) else x) for k, x in row.items()})
            state["epoch"] = epoch + 1
            improved = va["accuracy"] > state["best_val_accuracy"]
            if improved:
                state["best_val_accuracy"], state["best_epoch"], state["bad_epochs"] = va["accuracy"], epoch + 1, 0
            else:
                state["bad_epochs"] += 1
            stop_early = t.early_stopping_patience and state["bad_epochs"] >= t.early_stopping_patience
            if state["epoch"] == t.epochs or stop_early:
                state["status"] = "early_stopped" if stop_early and state["epoch"] < t.epochs else "finished"
            _save(paths, state, model, optimizer, schedule, scaler, improved)
            timing = {"epoch": epoch + 1, "epoch_seconds": round(time.perf_counter() - t0, 3),
                      "train_seconds": round(train_time, 3), "images_per_second": round(seen / train_time, 1),
                      "finished_at": round(time.time(), 1),
                      # what this run's caching allocator has held at most so far: with several runs on one
                      # GPU, their sum is what has to fit (empty on a CPU)
                      "gpu_peak_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
                      if device.type == "cuda" else ""}
            append_csv(paths.timing, timing, TIMING_COLUMNS)
            console.print(f"{paths.name} epoch {epoch + 1}/{t.epochs} lr {lr:.1e} "
                          f"train {row['train_loss']:.3f} {tr['accuracy']:.1%} "
                          f"val {val_loss:.3f} {va['accuracy']:.1%} F1 {va['macro_f1']:.3f} "
                          f"{timing['epoch_seconds']:.1f}s {timing['images_per_second']:.0f}/s"
                          + (" *" if improved else ""), soft_wrap=True)
            if state["status"] != "running":
                if stop_early:
                    console.print(f"{paths.name}: early stop, no better val accuracy in "
                                  f"{t.early_stopping_patience} epochs (best epoch {state['best_epoch']})")
                break
            if stop_after_epoch is not None and state["epoch"] >= stop_after_epoch:
                raise SystemExit(f"{paths.name}: stopped after epoch {state['epoch']} as asked")
    except Diverged as e:
        state["status"], state["message"] = "diverged", str(e)
        _save(paths, state, model, optimizer, schedule, scaler, False)
        console.print(f"[red]{paths.name} diverged:[/red] {e}")
    console.print(f"{paths.name}: {state['status']} in {time.perf_counter() - start_all:.1f}s, "
                  f"best val accuracy {max(state['best_val_accuracy'], 0):.3f} at epoch {state['best_epoch']}")
    return state


def _save(paths: RunPaths, state: dict, model, optimizer, schedule, scaler, improved: bool) -> None:
    weights = {k: x.detach().cpu() for k, x in model.state_dict().items()}
    if improved:
        save_checkpoint(paths.best, {**_public(state), "model": weights})
    save_checkpoint(paths.last, {**state, "model": weights, "optimizer": optimizer.state_dict(),
                                 "schedule": schedule.state_dict(), "rng": torch.get_rng_state(),
                                 **({"scaler": scaler.state_dict()} if scaler else {})})
    write_history(paths.history, state["history"])


def _public(state: dict) -> dict:
    return {k: state[k] for k in ("fingerprint", "name", "variant", "norm", "batch_size", "seed", "classes",
                                  "epoch", "mean", "std", "model_config", "transfer", "train") if k in state}


def write_history(path: Path, history: list[dict]) -> None:
    write_csv(path, history, HISTORY_COLUMNS)


def parse_run(argv: list[str], what: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m resnorm.{what}")
    ap.add_argument("--variant", help="a key of study.variants (default: the top-level experiment)")
    ap.add_argument("--seed", type=int, help="the seed of a study run (default: top-level seed)")
    args = ap.parse_args(argv)
    if (args.variant is None) != (args.seed is None):
        ap.error("--variant and --seed go together")
    return args


def main(argv: list[str]) -> None:
    args = parse_run(argv, "train")
    p = load_params()
    if args.variant is not None and args.seed not in p.study.seeds:
        raise UserError(f"--seed {args.seed} is not in study.seeds {list(p.study.seeds)}")
    train(p, args.variant, args.seed)


if __name__ == "__main__":
    run_cli(main)
