"""Classification scores shared by training (per-epoch history) and evaluation."""
from __future__ import annotations

import numpy as np
import torch

from .data import EpochBatches, Split, batches

# The F1 scores are scikit-learn's (f1_score / precision_recall_fscore_support with
# zero_division=0), computed here with numpy in the same float64 operations: importing
# sklearn.metrics costs about a second in every training and evaluation process, a minute of a
# study. tests/test_metrics.py holds these to scikit-learn's, bit for bit.


def _counts(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: true positives, predictions and true labels (the confusion matrix's diagonal,
    column sums and row sums)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    tp = np.bincount(y_true[y_true == y_pred], minlength=k)[:k]
    return tp, np.bincount(y_pred, minlength=k)[:k], np.bincount(y_true, minlength=k)[:k]


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den in float64, 0 where den is 0 (scikit-learn's zero_division=0)."""
    den = np.asarray(den, dtype=np.float64).copy()
    zero = den == 0
    den[zero] = 1
    out = np.asarray(num, dtype=np.float64) / den
    out[zero] = 0.0
    return out


def _f1(tp: np.ndarray, pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """2 tp / (true + pred), as scikit-learn writes F-beta at beta = 1."""
    return _divide(2.0 * tp.astype(np.float64), 1.0 * true.astype(np.float64) + pred.astype(np.float64))


def scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, micro-F1 and macro-F1; absent classes count as F1 0 in the macro mean."""
    tp, pred, true = _counts(y_true, y_pred, num_classes)
    micro = _f1(tp.sum(keepdims=True), pred.sum(keepdims=True), true.sum(keepdims=True))
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "micro_f1": float(np.nanmean(micro)),
        "macro_f1": float(np.nanmean(_f1(tp, pred, true))),
    }


def per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support of each class."""
    tp, pred, true = _counts(y_true, y_pred, len(classes))
    p, r, f = _divide(tp, pred), _divide(tp, true), _f1(tp, pred, true)
    return [{"class": c, "precision": round(float(p[i]), 4), "recall": round(float(r[i]), 4),
             "f1": round(float(f[i]), 4), "support": int(true[i])} for i, c in enumerate(classes)]


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
