"""Transfer learning from local weights: load, swap the head, freeze.

  model.weights: weights/resnet18-f37072fd.pth   # torchvision's ImageNet file, or a best.pt of this project
  model.freeze: stages:2                         # none | stem | stages:K | all-but-head
  train.head_lr: 0.05                            # the new classifier's own rate

Nothing is downloaded: the file must be on disk (README: how to get torchvision's files on a
machine with internet). The file's conv weights must fit the model exactly (same names and
shapes): that is what says it comes from the same architecture. The norm layers may differ
(norm swap): BN weights loaded into GN, LN, IN or BIN give them the affine parameters that fit
by name and shape, and every tensor left at its initial value, or in the file and unused, is
listed in the run's record (`transfer`) and in the report. The classifier is always new, for
the data set's r classes.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .io import UserError
from .model import stages, stem
from .params import ModelParams

HEAD = "fc."                      # the classifier's weights (the same name in both model families)
# the per-channel mean and std that torchvision's ImageNet weights were trained with (its transforms)
IMAGENET_STATS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# where `input_stats` says the statistics came from when they are the data set's own (from scratch)
FROM_DATA = "the train split"


def file_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, str | None, dict | None]:
    """(state dict, what the file is, its architecture if it says, the mean and std its inputs were
    normalized with if it says): a plain state dict (torchvision's files), {"state_dict": ...} or a
    checkpoint of this project ({"model": ..., "model_config": ..., "mean": ..., "std": ...}).
    A "module." prefix (nn.DataParallel) is dropped. Anything else is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.weights: {path}: no such file (nothing is downloaded; see the README's "
                        "transfer-learning section)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"model.weights: {path}: not a readable PyTorch file ({type(e).__name__}: {first})") from None
    arch, kind, stats = None, "state dict", None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        config = obj.get("model_config") or {}
        arch, kind = config.get("arch", "resnet6n2"), f"resnorm checkpoint ({config.get('norm', '?')})"
        if obj.get("mean") is not None and obj.get("std") is not None:
            stats = {"mean": [float(x) for x in obj["mean"]], "std": [float(x) for x in obj["std"]]}
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"model.weights: {path}: not a state dict (a mapping of names to tensors) "
                        "nor a checkpoint of this project")
    return {k.removeprefix("module."): v for k, v in obj.items()}, kind, arch, stats


def load_weights(model: nn.Module, path: str | Path, arch: str) -> dict:
    """Copy the file's weights into `model` (of `arch`) and return what was done, for the record.

    Conv weights must all be there with equal shapes, or it is another architecture: one line.
    Everything else (norm parameters and statistics, conv biases) is copied where name and shape
    match; the head (`fc.*`) keeps its fresh initialisation, sized for this data set.
    """
    sd, kind, file_arch, stats = read_weights(path)
    if file_arch is not None and file_arch != arch:
        raise UserError(f"model.weights: {path} holds a {file_arch} (its model_config); model.arch is {arch}")
    own = model.state_dict()
    convs = [f"{name}.weight" for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d)]
    file_convs = [k for k, v in sd.items() if k.endswith(".weight") and v.dim() == 4]
    missing = [k for k in convs if k not in sd]
    extra = [k for k in file_convs if k not in own]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(convs)} conv layers are not in the file (first: {missing[0]})")
        if extra:
            parts.append(f"the file has {len(extra)} conv layers the model lacks (first: {extra[0]})")
        raise UserError(f"model.weights: {path} does not fit model.arch = {arch}: {'; '.join(parts)}; "
                        "is it another architecture?")
    wrong = [k for k in convs if sd[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"model.weights: {path}: {k} is {list(sd[k].shape)} in the file but {list(own[k].shape)} "
                        f"in the model ({len(wrong)} conv weights differ in shape; other widths or input channels?)")
    loaded, kept, unused = {}, [], []
    for k, v in own.items():
        if k.startswith(HEAD):
            continue
        if k in sd and sd[k].shape == v.shape:
            loaded[k] = sd[k].to(v.dtype)
        else:
            kept.append(k)
    unused = sorted(k for k in sd if k not in loaded and not k.startswith(HEAD))
    model.load_state_dict(loaded, strict=False)
    if stats is None and kind == "state dict" and arch != "resnet6n2":
        stats = {**IMAGENET_STATS, "from": "ImageNet (torchvision's weights were trained with it)"}
    elif stats is not None:
        stats["from"] = f"the checkpoint {path}"
    return {"weights": str(path), "sha1": file_sha1(path), "source": kind, "loaded": len(loaded),
            "new_head": sorted(k for k in own if k.startswith(HEAD)), "not_loaded": kept, "unused": unused,
            "input_stats": stats}


def input_stats(choice: str, transfer: dict | None, data_stats) -> tuple[list[float], list[float], str]:
    """(mean, std, where they come from) for normalizing the input images (`model.input_stats`).

    A pretrained model's filters expect inputs normalized as in its own training: `auto` takes the
    weights file's statistics where it has them (a checkpoint of this project carries its mean and
    std; torchvision's files of ResNet-18/34/50 mean ImageNet's) and the data set's own otherwise,
    as from scratch. `data` and `imagenet` force one. `data_stats()` gives the train split's (mean, std)."""
    if choice == "imagenet":
        return IMAGENET_STATS["mean"], IMAGENET_STATS["std"], "ImageNet"
    found = (transfer or {}).get("input_stats")
    if choice == "auto" and found:
        return found["mean"], found["std"], found["from"]
    mean, std = data_stats()
    return mean, std, FROM_DATA


def describe(report: dict) -> str:
    """One line for the log and the report: what came from the file and what did not."""
    def kinds(keys):
        return ", ".join(f"{n} x {suffix}" for suffix, n in Counter(k.rsplit(".", 1)[-1] for k in keys).most_common())
    text = (f"{report['loaded']} tensors loaded from {report['weights']} ({report['source']}); "
            f"new head {', '.join(report['new_head'])}")
    if report["not_loaded"]:
        text += f"; left at their initial values (not in the file, or another shape): {kinds(report['not_loaded'])}"
    if report["unused"]:
        text += f"; in the file but unused: {kinds(report['unused'])}"
    return text


# --------------------------------------------------------------------------- freezing

def frozen_modules(model: nn.Module, spec: str) -> list[nn.Module]:
    """The modules `model.freeze` names: none | stem | stages:K (the stem and the first K stages) |
    all-but-head (every module except the classifier)."""
    if spec == "none":
        return []
    if spec == "all-but-head":
        return [m for name, m in model.named_children() if name != "fc"]
    parts = stem(model)
    if spec.startswith("stages:"):
        parts += stages(model)[:int(spec.split(":")[1])]
    elif spec != "stem":
        raise ValueError(f"freeze: unknown spec {spec!r}")
    return parts


def freeze(model: nn.Module, m: ModelParams) -> dict:
    """Stop gradients to the frozen modules' parameters and mark their norms, whose running
    statistics then stay as loaded (`keep_frozen_norms`). Returns counts for the record."""
    frozen = frozen_modules(model, m.freeze)
    norms = 0
    for part in frozen:
        for p in part.parameters():
            p.requires_grad_(False)
        for sub in part.modules():
            if getattr(sub, "running_mean", None) is not None:
                sub.frozen_stats = True
                norms += 1
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"freeze": m.freeze, "trainable_parameters": trainable, "frozen_parameters": total - trainable,
            "frozen_norms_with_statistics": norms}


def keep_frozen_norms(model: nn.Module) -> None:
    """After `model.train()`: frozen norms back to eval mode, so they normalize with, and do not
    update, their loaded running statistics (the usual fine-tuning practice)."""
    for sub in model.modules():
        if getattr(sub, "frozen_stats", False):
            sub.eval()
