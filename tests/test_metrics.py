"""resnorm.metrics computes the F1 scores with numpy (sklearn.metrics costs a second to import in
every stage process); these hold them to scikit-learn's, bit for bit."""
import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from resnorm.metrics import per_class, scores


def cases():
    """Label pairs: random, mostly right, all wrong, classes never predicted or never present,
    one sample, one class."""
    rng = np.random.default_rng(0)
    out = []
    for k, n in ((25, 7500), (25, 60), (7, 13), (3, 1), (1, 5), (10, 200)):
        y = rng.integers(0, k, n)
        out.append((k, y, rng.integers(0, k, n)))                          # random
        out.append((k, y, np.where(rng.random(n) < 0.8, y, rng.integers(0, k, n))))  # mostly right
        out.append((k, y, (y + 1) % k if k > 1 else y))                   # all wrong (one class: all right)
        out.append((k, y, np.zeros(n, dtype=np.int64)))                   # one class predicted
        out.append((k, np.minimum(y, max(k - 3, 0)), y))                  # top classes never true
    return out


@pytest.mark.parametrize("k,y_true,y_pred", cases())
def test_scores_equal_scikit_learns(k, y_true, y_pred):
    labels = list(range(k))
    got = scores(y_true, y_pred, k)
    assert got["micro_f1"] == float(f1_score(y_true, y_pred, labels=labels, average="micro", zero_division=0))
    assert got["macro_f1"] == float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    assert got["accuracy"] == float(np.mean(y_true == y_pred))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    rows = per_class(y_true, y_pred, [f"c{i}" for i in labels])
    assert [row["class"] for row in rows] == [f"c{i}" for i in labels]
    assert [(row["precision"], row["recall"], row["f1"], row["support"]) for row in rows] == \
        [(round(float(a), 4), round(float(b), 4), round(float(c), 4), int(d)) for a, b, c, d in zip(p, r, f, s)]


def test_unrounded_per_class_f1_equals_the_macro_terms():
    """The per-class F1 (before rounding) is exactly scikit-learn's vector, so the macro mean is too."""
    from resnorm.metrics import _counts, _f1
    rng = np.random.default_rng(1)
    y, yp = rng.integers(0, 25, 999), rng.integers(0, 25, 999)
    _, _, f, _ = precision_recall_fscore_support(y, yp, labels=list(range(25)), zero_division=0)
    assert np.array_equal(_f1(*_counts(y, yp, 25)), f)


def test_metrics_module_does_not_import_sklearn():
    import subprocess
    import sys
    code = "import sys, resnorm.metrics, resnorm.train, resnorm.evaluate; print('sklearn' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
