"""The report's statistics against scipy.stats on fixed numbers."""
import math

import pytest
from scipy import stats as sps

from resnorm.stats import binomial_se, compare, mean_interval, paired, welch

A = [0.640, 0.602, 0.677]
B = [0.618, 0.610, 0.627]
C = [0.52, 0.33, 0.71, 0.49]


def test_paired_matches_scipy_ttest_rel():
    c = paired(A, B)
    ref = sps.ttest_rel(A, B)
    assert c.t == pytest.approx(ref.statistic, rel=1e-12) and c.p == pytest.approx(ref.pvalue, rel=1e-12)
    ci = ref.confidence_interval(0.95)
    assert (c.low, c.high) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))
    assert c.df == 2 and c.test == "paired t" and c.diff == pytest.approx(sum(A) / 3 - sum(B) / 3)


def test_welch_matches_scipy_ttest_ind_unequal_variances():
    c = welch(A, C)
    ref = sps.ttest_ind(A, C, equal_var=False)
    assert c.t == pytest.approx(ref.statistic, rel=1e-12) and c.p == pytest.approx(ref.pvalue, rel=1e-12)
    assert c.df == pytest.approx(ref.df, rel=1e-12)
    ci = ref.confidence_interval(0.95)
    assert (c.low, c.high) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))


def test_three_seeds_need_the_t_critical_value_not_two_standard_errors():
    c = paired(A, B)
    half = (c.high - c.low) / 2
    se = c.diff / c.t
    assert half / se == pytest.approx(4.302652729911275, rel=1e-9)   # t(0.975, 2), not 1.96


def test_compare_pairs_shared_seeds_and_falls_back_to_welch():
    a, b = dict(zip((0, 1, 2), A)), dict(zip((0, 1, 2), B))
    assert compare(a, b).test == "paired t"
    assert compare(a, {0: 0.5, 1: 0.6, 5: 0.7}).test == "Welch t"
    assert compare(a, {0: 0.5}) is None


def test_wording_never_turns_not_significant_into_confirmed():
    weak = paired(A, B)
    assert not weak.significant and "not significant" in weak.describe()
    assert "not evidence that they are equal" in weak.describe()
    strong = paired([0.9, 0.91, 0.92, 0.93], [0.5, 0.52, 0.5, 0.51])
    assert strong.significant and strong.describe().endswith("significant at the 5% level")
    assert "confirm" not in weak.describe() + strong.describe()


def test_zero_spread_and_mean_interval():
    c = paired([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])
    assert c.p == 0.0 and c.low == c.high == pytest.approx(0.1)
    same = paired([0.5, 0.6], [0.5, 0.6])
    assert same.p == 1.0 and not same.significant
    m, lo, hi = mean_interval(C)
    ref = sps.t.interval(0.95, len(C) - 1, loc=sum(C) / 4, scale=sps.sem(C))
    assert (lo, hi) == (pytest.approx(ref[0], rel=1e-12), pytest.approx(ref[1], rel=1e-12))
    assert math.isnan(mean_interval([0.3])[1])


def test_binomial_standard_error():
    assert binomial_se(0.5, 60) == pytest.approx(math.sqrt(0.25 / 60))
    assert binomial_se(1.0, 60) == 0.0 and math.isnan(binomial_se(0.5, 0))
    with pytest.raises(ValueError):
        paired([0.1], [0.2])
