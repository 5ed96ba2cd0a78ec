"""The report's statistics against scipy.stats on fixed numbers."""
import math

import pytest
from scipy import stats as sps

from resnorm.stats import Family, binomial_se, compare, holm, mean_interval, paired, welch

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


def test_holm_adjusts_by_the_step_down_rule():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept at 0.06 (non-decreasing)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.9, 0.8]) == [1.0, 1.0] and holm([]) == []


def holm_rejects(pvalues: list[float], alpha: float) -> list[bool]:
    """Holm's procedure as first written: walk up the sorted p-values, reject while p_(i) <= alpha / (m - i)."""
    m, rejected = len(pvalues), [False] * len(pvalues)
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        if pvalues[i] > alpha / (m - rank):
            break
        rejected[i] = True
    return rejected


@pytest.mark.parametrize("seed", range(20))
def test_holm_adjusted_p_below_alpha_exactly_when_the_procedure_rejects(seed):
    import random
    rng = random.Random(seed)
    ps = [rng.random() ** 4 for _ in range(rng.randint(1, 25))]      # many small ones, as in a real report
    q = holm(ps)
    assert all(a >= b for a, b in zip(q, ps))                         # never below the raw p
    for alpha in (0.01, 0.05, 0.1):
        assert [x <= alpha for x in q] == holm_rejects(ps, alpha)


def test_family_keeps_one_test_per_key_and_corrects_them_together():
    fam = Family()
    ab = fam.add("a minus b", "norms", paired(A, B), key=frozenset("ab"))
    assert fam.add("b minus a", "sanity", paired(B, A), key=frozenset("ab")) is not None   # shown, not counted twice
    fam.add("a minus c", "norms", welch(A, C))
    assert fam.add("none", "norms", None) is None
    assert len(fam) == 2
    (n1, s1, c1, q1), (n2, _, c2, q2) = fam.corrected()
    assert (n1, s1, c1) == ("a minus b", "norms", ab)
    assert [q1, q2] == holm([c1.p, c2.p])
