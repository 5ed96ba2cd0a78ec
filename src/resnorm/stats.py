"""The statistics behind every comparison in the report: t-tests with intervals, and binomial error.

With 3 seeds a normal approximation ("2 standard errors") is far too optimistic: the
t critical value for 2 degrees of freedom is 4.30, not 1.96. So:

- runs that share seeds (same initialisation and data order) are compared *paired*:
  a one-sample t on the per-seed differences, df = n - 1;
- otherwise *Welch's* t, with the Welch-Satterthwaite degrees of freedom;
- every difference comes with its confidence interval, from the t distribution;
- a non-significant result says the data cannot tell the two apart, never that they are equal.

scipy.stats gives the t distribution; the tests check these numbers against
scipy.stats.ttest_rel / ttest_ind(equal_var=False).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Hashable
from dataclasses import dataclass

from scipy import stats as sps

ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    """mean(a) - mean(b) with its confidence interval and two-sided t-test."""
    test: str               # "paired t" or "Welch t"
    diff: float
    low: float
    high: float
    t: float
    df: float
    p: float
    n: int                  # pairs (paired) or the smaller sample (Welch)
    confidence: float = 1 - ALPHA

    @property
    def significant(self) -> bool:
        return self.p < 1 - self.confidence

    def interval(self) -> str:
        return f"{self.diff:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    def describe(self) -> str:
        """One clause: the difference, its interval, the test, and what it does and does not show."""
        pct = round(self.confidence * 100)
        core = (f"{self.diff:+.3f} ({pct}% CI {self.low:+.3f} to {self.high:+.3f}; {self.test}, "
                f"t({self.df:.3g}) = {self.t:.2f}, p = {self.p:.3g})")
        if self.significant:
            return core + ": significant at the 5% level"
        return core + ": not significant, so these data cannot tell the two apart (which is not evidence that they are equal)"


def _t_result(test: str, diff: float, se: float, df: float, n: int, confidence: float) -> Comparison:
    if se == 0:                     # identical differences: no spread to test against
        p = 1.0 if diff == 0 else 0.0
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return Comparison(test, diff, diff, diff, t, df, p, n, confidence)
    t = diff / se
    half = sps.t.ppf(0.5 + confidence / 2, df) * se
    return Comparison(test, diff, diff - half, diff + half, t, df, float(2 * sps.t.sf(abs(t), df)), n, confidence)


def paired(a: list[float], b: list[float], confidence: float = 1 - ALPHA) -> Comparison:
    """Paired t over matched runs (a[i] and b[i] share seed i): a t-test of the differences against 0."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired: need two equal-length samples of at least 2, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    return _t_result("paired t", statistics.fmean(d), statistics.stdev(d) / math.sqrt(n), n - 1, n, confidence)


def welch(a: list[float], b: list[float], confidence: float = 1 - ALPHA) -> Comparison:
    """Welch's unequal-variance t with Welch-Satterthwaite degrees of freedom."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch: need at least 2 values on each side, got {len(a)} and {len(b)}")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se else len(a) + len(b) - 2
    return _t_result("Welch t", statistics.fmean(a) - statistics.fmean(b), se, df, min(len(a), len(b)), confidence)


def compare(a: dict[int, float], b: dict[int, float], confidence: float = 1 - ALPHA) -> Comparison | None:
    """Runs keyed by seed: paired over the shared seeds when every seed is shared, else Welch.
    None when either side has fewer than 2 runs."""
    if set(a) == set(b) and len(a) >= 2:
        seeds = sorted(a)
        return paired([a[s] for s in seeds], [b[s] for s in seeds], confidence)
    if len(a) < 2 or len(b) < 2:
        return None
    return welch(list(a.values()), list(b.values()), confidence)


def mean_interval(values: list[float], confidence: float = 1 - ALPHA) -> tuple[float, float, float]:
    """Mean and its t confidence interval (nan bounds with fewer than 2 values)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan, math.nan
    half = sps.t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def binomial_se(accuracy: float, n: int) -> float:
    """Sampling standard error of one accuracy measured on n independent images: sqrt(p (1 - p) / n).

    It is what a different draw of the same-sized test set would move the score by, which
    the spread over seeds (one fixed test set) does not show."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n) if n else math.nan


def holm(pvalues: list[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the input's order.

    Sorted ascending, the i-th smallest of m p-values (i from 0) is multiplied by m - i, and
    the adjusted values are made non-decreasing in that order (capped at 1). A test whose
    adjusted p is below alpha is rejected by Holm's procedure, which keeps the chance of even
    one false rejection among all m tests at alpha, however the tests depend on each other."""
    m = len(pvalues)
    adjusted = [math.nan] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


class Family:
    """Every distinct test a report makes, so that all of them can be corrected together.

    One comparison shown twice (B against the best, and the best against B) is one test: give
    both the same `key` (default: the name) and the first one added stands for it."""

    def __init__(self):
        self.tests: dict[Hashable, tuple[str, str, Comparison]] = {}

    def add(self, name: str, section: str, c: Comparison | None, key: Hashable = None) -> Comparison | None:
        key = name if key is None else key
        if c is not None and key not in self.tests:
            self.tests[key] = (name, section, c)
        return c

    def __len__(self) -> int:
        return len(self.tests)

    def corrected(self) -> list[tuple[str, str, Comparison, float]]:
        """(name, section, comparison, Holm-adjusted p) for every test, in the order they were added."""
        items = list(self.tests.values())
        adjusted = holm([c.p for _, _, c in items])
        return [(name, section, c, q) for (name, section, c), q in zip(items, adjusted)]
