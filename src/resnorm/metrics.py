"""Classification scores shared by training (per-epoch history) and evaluation."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score, precision_recall_fscore_support

from .data import EpochBatches, Split, batches


def scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, micro-F1 and macro-F1 (scikit-learn); absent classes count as F1 0 in the macro mean."""
    labels = list(range(num_classes))
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "micro_f1": float(f1_score(y_true, y_pred, labels=labels, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }


def per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> list[dict]:
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(range(len(classes))), zero_division=0)
    return [{"class": c, "precision": round(float(p[i]), 4), "recall": round(float(r[i]), 4),
             "f1": round(float(f[i]), 4), "support": int(s[i])} for i, c in enumerate(classes)]


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, mean, std, batch_size: int, device: torch.device,
            autocast=None, channels_last: bool = False,
            resident: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy, predicted labels and class probabilities over a split, in eval mode.

    Losses and probabilities stay on the device until the end (one transfer, no wait per batch);
    `resident` is the split already on the device (`data.on_device`). The loss is summed in
    batch order in float64, as a running `float()` sum would."""
    model.eval()
    ds = EpochBatches(split, batch_size, mean, std, shuffle=False)
    losses, probs = [], []
    for batch in batches(ds, resident=resident):
        x, y = ds.to(batch, device, channels_last)
        if autocast is not None:
            with autocast():
                logits = model(x)
        else:
            logits = model(x)
        logits = logits.float()
        losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        probs.append(torch.softmax(logits, 1))
    if not probs:
        return 0.0, np.zeros(0, dtype=np.int64), np.zeros((0, 0))
    total = sum(torch.stack(losses).double().cpu().tolist())
    p = torch.cat(probs).cpu().numpy()
    return total / max(len(split), 1), p.argmax(1), p
