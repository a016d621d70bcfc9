"""lmstack.monitor.stattests: parity with scipy, Evidently's pinned values, and hand-computed PSI / z."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmstack.monitor import stattests

scipy_stats = pytest.importorskip("scipy.stats")
from scipy.spatial.distance import jensenshannon


def _samples(seed=0, n=300, m=200, shift=0.3):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, n), rng.normal(shift, 1.2, m)


@pytest.mark.parametrize("seed,n,m", [(0, 300, 200), (1, 50, 80), (2, 2000, 1500), (3, 12000, 11000)])
def test_ks_matches_scipy(seed, n, m):
    a, b = _samples(seed, n, m)
    r = stattests.ks(a, b)
    ref = scipy_stats.ks_2samp(a, b)
    assert r.statistic == pytest.approx(ref.statistic, abs=1e-12)
    assert r.p_value == pytest.approx(ref.pvalue, abs=1e-6)
    assert r.threshold == 0.05 and r.drifted == (ref.pvalue < 0.05)


def test_ks_statistic_with_ties_matches_scipy():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 10, 400), rng.integers(1, 11, 300)
    assert stattests.ks_statistic(a, b) == pytest.approx(scipy_stats.ks_2samp(a, b).statistic, abs=1e-12)


def test_chi2_matches_scipy_and_evidently_pinned():
    ref = np.repeat([1, 2, 3, 4, 5, 6], [16, 18, 16, 14, 12, 12])
    cur = np.repeat([1, 2, 3, 4, 5, 6], [16, 16, 16, 16, 16, 8])
    r = stattests.chi2(ref, cur)
    expected = np.array([16, 18, 16, 14, 12, 12]) * (88 / 88)
    sc = scipy_stats.chisquare([16, 16, 16, 16, 16, 8], expected)
    assert r.statistic == pytest.approx(sc.statistic, abs=1e-9)
    assert r.p_value == pytest.approx(sc.pvalue, abs=1e-9)
    assert r.p_value == pytest.approx(0.67309, abs=1e-5)  # Evidently's test_freq_obs_eq_freq_exp
    ref2 = np.repeat([1, 2, 3, 4, 5, 6], [32, 36, 32, 28, 24, 24])  # doubled reference: same p (test_freq_obs_not_eq)
    assert stattests.chi2(ref2, cur).p_value == pytest.approx(0.67309, abs=1e-5)
    assert stattests.chi2(list("abc" * 10), list("abc" * 10)).p_value == pytest.approx(1.0)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 31])
def test_chi2_sf_matches_scipy(df):
    for x in (0.01, 0.5, 1.0, 3.3, 10.0, 40.0, 120.0):
        assert stattests.chi2_sf(x, df) == pytest.approx(scipy_stats.chi2.sf(x, df), abs=1e-10)


def test_chi2_unseen_category_is_infinite():
    r = stattests.chi2(["a"] * 10 + ["b"] * 10, ["a"] * 10 + ["c"])
    assert math.isinf(r.statistic) and r.p_value == 0.0 and r.drifted


def test_z_test_hand_computed():
    # reference 30/100 ones, current 45/100: P = 0.375, se = sqrt(.375*.625*(2/100)) = 0.068465,
    # z = (0.30 - 0.45) / 0.068465 = -2.19089, p = 2 (1 - Phi(2.19089)) = 0.028459
    ref = [1] * 30 + [0] * 70
    cur = [1] * 45 + [0] * 55
    r = stattests.z_test(ref, cur)
    assert r.statistic == pytest.approx(-2.190890, abs=1e-6)
    assert r.p_value == pytest.approx(2 * scipy_stats.norm.sf(2.1908902300206643), abs=1e-9)
    assert r.p_value == pytest.approx(0.028459, abs=1e-6) and r.drifted
    # Evidently's pinned values: identical samples -> p 1
    assert stattests.z_test(["a", "b"] * 10, ["a", "b"] * 10).p_value == pytest.approx(1.0)
    assert stattests.z_test(["a"] * 5, ["a"] * 5) == stattests.Result(0.0, 1.0, 0.05, False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wasserstein_matches_scipy(seed):
    a, b = _samples(seed, 137, 211)
    r = stattests.wasserstein_normed(a, b)
    assert r.statistic == pytest.approx(scipy_stats.wasserstein_distance(a, b) / np.std(a), abs=1e-9)
    assert r.p_value is None and r.threshold == 0.1 and r.drifted == (r.statistic >= 0.1)
    assert stattests.wasserstein_normed([1.0] * 5, [1.0] * 3).statistic == 0.0  # std floored at 0.001


def test_jensen_shannon_matches_scipy_numeric_and_categorical():
    a, b = _samples(4, 500, 400, shift=0.5)
    r = stattests.jensen_shannon(a, b)
    edges = np.histogram_bin_edges(np.concatenate([a, b]), bins="sturges")
    pr, pc = np.histogram(a, edges)[0] / len(a), np.histogram(b, edges)[0] / len(b)
    pr[pr == 0] = 0.0001
    pc[pc == 0] = 0.0001
    assert r.statistic == pytest.approx(jensenshannon(pr, pc), abs=1e-9) and r.drifted
    cats_r, cats_c = list("aab" * 40 + "c"), list("abb" * 40)
    rc = stattests.jensen_shannon(cats_r, cats_c)
    p = np.array([80, 40, 1]) / 121
    q = np.array([40, 80, 0]) / 120
    q[2] = 0.0001
    assert rc.statistic == pytest.approx(jensenshannon(p, q), abs=1e-9)


def test_psi_hand_computed():
    # categorical shares: ref (0.5, 0.3, 0.2), cur (0.4, 0.4, 0.2):
    # psi = 0.1 ln(0.5/0.4) + (-0.1) ln(0.3/0.4) + 0 = 0.0223144 + 0.0287682 = 0.0510826
    ref = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    cur = ["a"] * 40 + ["b"] * 40 + ["c"] * 20
    r = stattests.psi(ref, cur)
    assert r.statistic == pytest.approx(0.1 * math.log(0.5 / 0.4) + 0.1 * math.log(0.4 / 0.3), abs=1e-12)
    assert r.statistic == pytest.approx(0.0510826, abs=1e-6) and not r.drifted
    # an empty current bin is filled with 0.0001: (0.5 - 1e-4) ln(0.5 / 1e-4) + (1e-4... )
    r2 = stattests.psi(["a"] * 50 + ["b"] * 50, ["a"] * 10)
    want = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - 0.0001) * math.log(0.5 / 0.0001)
    assert r2.statistic == pytest.approx(want, abs=1e-12) and r2.drifted


def test_result_is_frozen():
    r = stattests.psi([1, 2], [1, 2])
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        r.statistic = 1.0  # type: ignore[misc]


def test_mmd_permutation_detects_shift_and_not_null():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, (60, 5)), rng.normal(0, 1, (60, 5))
    null = stattests.mmd(x, y, n_permutations=100, seed=1)
    shifted = stattests.mmd(x, y + 0.8, n_permutations=100, seed=1)
    assert null.p_value > 0.05 and not null.drifted
    assert shifted.p_value == pytest.approx(1 / 101) and shifted.drifted
    assert stattests.mmd(x, y + 0.8, n_permutations=100, seed=1) == shifted  # seeded


def test_mmd2_unbiased_matches_direct_formula():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 2)), rng.normal(size=(9, 2))
    bw = 1.3

    def k(a, b):
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * bw * bw))

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / 72
    xy = sum(k(a, b) for a in x for b in y) / 63
    assert stattests.mmd2(x, y, bw) == pytest.approx(xx + yy - 2 * xy, abs=1e-12)


def test_roc_auc_matches_mann_whitney():
    rng = np.random.default_rng(2)
    s = np.round(rng.normal(size=200), 1)  # ties
    y = (rng.random(200) < 0.4).astype(int)
    u = scipy_stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert stattests.roc_auc(s, y) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()), abs=1e-12)


def test_classifier_test_separates_shifted_embeddings():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, (150, 8)), rng.normal(0, 1, (150, 8))
    null = stattests.classifier_test(x, y, seed=0)
    shifted = stattests.classifier_test(x, y + np.r_[0.6, np.zeros(7)], seed=0)
    assert 0.35 < null.statistic < 0.62 and not null.drifted
    assert shifted.statistic > 0.6 and shifted.drifted


def test_mmd_null_equals_reindexed_kernel():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(9, 3))
    obs, null = stattests.mmd_permutation(x, y, n_permutations=5, seed=3, bandwidth=1.1)
    pooled = np.vstack([x, y])
    perm_rng = np.random.default_rng(3)
    for v in null:
        idx = perm_rng.permutation(21)
        assert v == pytest.approx(stattests.mmd2(pooled[idx[:12]], pooled[idx[12:]], 1.1), abs=1e-12)
    assert obs == pytest.approx(stattests.mmd2(x, y, 1.1), abs=1e-12)


def test_empty_or_non_binary_samples_are_user_errors():
    from lmstack.errors import LmstackError

    with pytest.raises(LmstackError, match="current sample is empty"):
        stattests.wasserstein_normed([1.0, 2.0], [])
    with pytest.raises(LmstackError, match="needs a binary variable, got 3"):
        stattests.z_test([0, 1, 2], [0, 1])


def test_ks_critical_and_chi2_isf_match_scipy():
    for n, m in ((50, 80), (300, 200), (1000, 900)):
        d = stattests.ks_critical(n, m)
        # the asymptotic KS p-value at the critical D is 0.05 (scipy's kstwobign with the same correction)
        ne = n * m / (n + m)
        lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
        assert scipy_stats.kstwobign.sf(lam) == pytest.approx(0.05, abs=1e-9)
    for df in (1, 4, 7):
        assert stattests.chi2_isf(0.05, df) == pytest.approx(scipy_stats.chi2.isf(0.05, df), abs=1e-8)
