"""Two-sample drift tests: each ``(reference, current, **params) -> Result(statistic, p_value, threshold, drifted)``.

Definitions follow Evidently's defaults where they overlap (``evidently.legacy.calculations.stattests``):

- :func:`ks` -- two-sample Kolmogorov-Smirnov; drifted when the p-value < 0.05 (the p-value is scipy's
  ``ks_2samp``, method ``auto``: exact for samples up to 10 000, else asymptotic).
- :func:`chi2` -- Pearson's chi-square on category counts, the expected counts being the reference shares scaled
  to the current size; drifted when p < 0.05.
- :func:`z_test` -- two-proportion z-test (pooled variance) on a binary variable, two-sided; drifted when p < 0.05.
- :func:`wasserstein_normed` -- the first Wasserstein distance divided by the reference's standard deviation
  (floored at 0.001); drifted when >= 0.1.
- :func:`jensen_shannon` -- Jensen-Shannon *distance* (natural log, as ``scipy.spatial.distance.jensenshannon``)
  of the binned shares; drifted when >= 0.1.
- :func:`psi` -- population stability index ``sum((r - c) * ln(r / c))`` of the binned shares; drifted when >= 0.1.

Binning (:func:`binned_shares`, Evidently's ``get_binned_data``): a numeric variable with more than 20 distinct
reference values gets Sturges bins over reference and current together; otherwise each distinct value is a
category. Empty bins are filled (``feel_zeroes``) with 0.0001, or with the smallest non-zero share / 10**6 where
that share is itself <= 0.0001, so the logarithms stay finite.

Beyond Evidently: :func:`mmd` (RBF kernel, median-heuristic bandwidth, permutation p-value) and
:func:`classifier_test` (logistic regression, cross-validated ROC-AUC, Mann-Whitney p-value) for embeddings.
Everything here is numpy; only :func:`ks` needs scipy (the ``monitor`` extra) for its exact p-value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from lmstack.errors import DataError


@dataclass(frozen=True)
class Result:
    statistic: float
    p_value: float | None
    threshold: float
    drifted: bool

    def to_dict(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "p_value": self.p_value, "threshold": self.threshold,
                "drifted": self.drifted}


def _num(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    if a.size == 0:
        raise DataError(f"{name} sample is empty")
    return a


# ------------------------------------------------------------------------------------------ distributions

def chi2_sf(x: float, df: int) -> float:
    """Survival function of the chi-square distribution for an integer ``df`` (closed forms, no scipy):
    even df: exp(-x/2) sum_{i<df/2} (x/2)^i / i!; odd df: 2 Q(sqrt x) + 2 phi(sqrt x) sum_{i=1}^{(df-1)/2}
    x^{i-1/2} / (1*3*...*(2i-1))."""
    if df < 1:
        raise DataError(f"df must be >= 1, got {df}")
    if x <= 0:
        return 1.0
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, df // 2):
            term *= (x / 2) / i
            total += term
        return min(1.0, math.exp(-x / 2) * total)
    s = math.sqrt(x)
    tail = math.erfc(s / math.sqrt(2))  # 2 * (1 - Phi(sqrt x))
    if df == 1:
        return tail
    phi = math.exp(-x / 2) / math.sqrt(2 * math.pi)
    term, total = s, s  # i = 1: x^{1/2} / 1
    for i in range(2, (df - 1) // 2 + 1):
        term *= x / (2 * i - 1)
        total += term
    return min(1.0, tail + 2 * phi * total)


def inverse_tail(tail: Any, p: float, start: float = 1.0, iterations: int = 200) -> float:
    """The x >= 0 with ``tail(x) = p`` for a tail probability that falls as x grows: double ``start`` until
    the tail is below ``p``, then bisect ``iterations`` times."""
    lo, hi = 0.0, start
    while tail(hi) > p:
        hi *= 2
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) > p else (lo, mid)
    return (lo + hi) / 2


def chi2_isf(p: float, df: int) -> float:
    """The x with chi2_sf(x, df) = p (bisection)."""
    return inverse_tail(lambda x: chi2_sf(x, df), p, start=max(1.0, float(df)))


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution: 2 sum_k (-1)^(k-1) exp(-2 k^2 lam^2)."""
    if lam < 0.2:
        return 1.0
    return min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101)))


def ks_critical(n: int, m: int, alpha: float = 0.05) -> float:
    """The two-sample KS D above which the asymptotic p-value is < alpha, with Stephens' small-sample correction
    (lam = (sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) D, ne = n m / (n + m); Numerical Recipes 14.3)."""
    lo, hi = 0.2, 5.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kolmogorov_sf(mid) > alpha else (lo, mid)
    ne = n * m / (n + m)
    return (lo + hi) / 2 / (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne))


def normal_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


# ------------------------------------------------------------------------------------------ binning

def _categories(reference: Sequence[Any], current: Sequence[Any]) -> tuple[list[Any], np.ndarray, np.ndarray]:
    from collections import Counter

    rc, cc = Counter(list(reference)), Counter(list(current))
    keys = sorted(set(rc) | set(cc), key=lambda k: (str(type(k)), k))
    return keys, np.array([rc[k] for k in keys], float), np.array([cc[k] for k in keys], float)


def _fill_zeroes(p: np.ndarray) -> np.ndarray:
    p = p.copy()
    nz = p[p != 0]
    if nz.size and (p == 0).any():
        p[p == 0] = nz.min() / 10**6 if nz.min() <= 0.0001 else 0.0001
    return p


def binned_shares(reference: Sequence[Any], current: Sequence[Any], categorical: bool | None = None,
                  fill_zeroes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(reference shares, current shares) over common bins, as Evidently bins them (see the module docstring)."""
    if len(reference) == 0 or len(current) == 0:
        raise DataError("binned_shares needs non-empty reference and current samples")
    if categorical is None:
        try:
            ref = np.asarray(reference, dtype=float)
            categorical = np.unique(ref).size <= 20
        except (TypeError, ValueError):
            categorical = True
    if categorical:
        _, r, c = _categories(reference, current)
    else:
        ref, cur = np.asarray(reference, float), np.asarray(current, float)
        edges = np.histogram_bin_edges(np.concatenate([ref, cur]), bins="sturges")
        r, c = np.histogram(ref, edges)[0].astype(float), np.histogram(cur, edges)[0].astype(float)
    r, c = r / len(reference), c / len(current)
    if fill_zeroes:
        r, c = _fill_zeroes(r), _fill_zeroes(c)
    return r, c


# ------------------------------------------------------------------------------------------ Evidently's tests

def ks_statistic(reference: Any, current: Any) -> float:
    """sup |F_ref - F_cur| over the pooled sample (both empirical CDFs right-continuous)."""
    a, b = np.sort(_num(reference, "reference")), np.sort(_num(current, "current"))
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


def ks(reference: Any, current: Any, threshold: float = 0.05) -> Result:
    from lmstack.extras import require

    stats = require("scipy.stats", "the KS test's p-value")
    d = ks_statistic(reference, current)
    p = float(stats.ks_2samp(_num(reference, "reference"), _num(current, "current")).pvalue)
    return Result(d, p, threshold, p < threshold)


def chi2(reference: Sequence[Any], current: Sequence[Any], threshold: float = 0.05) -> Result:
    """Pearson chi-square of the current counts against the reference shares scaled to the current size
    (Evidently's ``chisquare``). A category absent from the reference has expected count 0: statistic inf, p 0."""
    if len(reference) == 0 or len(current) == 0:
        raise DataError("chi2 needs non-empty reference and current samples")
    _, r, c = _categories(reference, current)
    if r.size < 2:
        return Result(0.0, 1.0, threshold, False)
    expected = r * (c.sum() / r.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = np.where(expected > 0, expected, 1)
        terms = np.where(expected > 0, (c - expected) ** 2 / safe, np.where(c > 0, np.inf, 0))
    stat = float(terms.sum())
    p = 0.0 if math.isinf(stat) else chi2_sf(stat, r.size - 1)
    return Result(stat, p, threshold, p < threshold)


def z_test(reference: Sequence[Any], current: Sequence[Any], threshold: float = 0.05) -> Result:
    """Two-proportion z-test of a binary variable (Evidently's ``z``): the first of the sorted values is 0, the
    other 1; z = (p_ref - p_cur) / sqrt(P (1 - P) (1/n_ref + 1/n_cur)), P pooled; p two-sided."""
    if len(reference) == 0 or len(current) == 0:
        raise DataError("z_test needs non-empty reference and current samples")
    keys = sorted(set(reference) | set(current))
    if len(keys) > 2:
        raise DataError(f"z_test needs a binary variable, got {len(keys)} distinct values")
    if len(keys) == 1:
        return Result(0.0, 1.0, threshold, False)
    ones_r = sum(1 for x in reference if x != keys[0])
    ones_c = sum(1 for x in current if x != keys[0])
    z = two_proportion_z(ones_r, len(reference), ones_c, len(current))
    p = normal_two_sided(z)
    return Result(z, p, threshold, p < threshold)


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> float:
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    return 0.0 if var <= 0 else (p1 - p2) / math.sqrt(var)


def wasserstein(reference: Any, current: Any) -> float:
    """W1 = integral |F_ref - F_cur| over the pooled support."""
    a, b = np.sort(_num(reference, "reference")), np.sort(_num(current, "current"))
    grid = np.sort(np.concatenate([a, b]))
    deltas = np.diff(grid)
    fa = np.searchsorted(a, grid[:-1], side="right") / a.size
    fb = np.searchsorted(b, grid[:-1], side="right") / b.size
    return float(np.sum(np.abs(fa - fb) * deltas))


def wasserstein_normed(reference: Any, current: Any, threshold: float = 0.1) -> Result:
    norm = max(float(np.std(_num(reference, "reference"))), 0.001)
    w = wasserstein(reference, current) / norm
    return Result(w, None, threshold, w >= threshold)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    p, q = np.asarray(p, float) / np.sum(p), np.asarray(q, float) / np.sum(q)
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        mask = x > 0
        return float(np.sum(x[mask] * np.log(x[mask] / m[mask])))

    return math.sqrt(max((kl(p) + kl(q)) / 2, 0.0))


def jensen_shannon(reference: Sequence[Any], current: Sequence[Any], threshold: float = 0.1,
                   categorical: bool | None = None) -> Result:
    r, c = binned_shares(reference, current, categorical)
    d = js_distance(r, c)
    return Result(d, None, threshold, d >= threshold)


def psi(reference: Sequence[Any], current: Sequence[Any], threshold: float = 0.1,
        categorical: bool | None = None) -> Result:
    r, c = binned_shares(reference, current, categorical)
    value = float(np.sum((r - c) * np.log(r / c)))
    return Result(value, None, threshold, value >= threshold)


# ------------------------------------------------------------------------------------------ embeddings

def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.maximum(d, 0.0)


def median_bandwidth(x: np.ndarray) -> float:
    """The median heuristic (Gretton et al. 2012): the median pairwise distance of the pooled sample."""
    d = np.sqrt(_sq_dists(x, x)[np.triu_indices(len(x), 1)])
    med = float(np.median(d)) if d.size else 1.0
    return med if med > 0 else 1.0


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD^2 with the RBF kernel exp(-|a-b|^2 / (2 bandwidth^2))."""
    k = np.exp(-_sq_dists(np.vstack([x, y]), np.vstack([x, y])) / (2 * bandwidth**2))
    return _mmd2_from_kernel(k, len(x))


def _mmd2_from_kernel(k: np.ndarray, n: int) -> float:
    m = k.shape[0] - n
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    sxx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())


def mmd_permutation(reference: Any, current: Any, n_permutations: int = 200, seed: int = 0,
                    bandwidth: float | None = None) -> tuple[float, np.ndarray]:
    """(observed MMD^2, its permutation null: MMD^2 of ``n_permutations`` random relabellings of the pool)."""
    x, y = np.asarray(reference, float), np.asarray(current, float)
    if x.ndim == 1:
        x, y = x[:, None], y[:, None]
    if len(x) < 2 or len(y) < 2:
        raise DataError("mmd needs at least 2 points in each sample")
    pooled = np.vstack([x, y])
    bw = bandwidth or median_bandwidth(pooled)
    k = np.exp(-_sq_dists(pooled, pooled) / (2 * bw**2))
    observed = _mmd2_from_kernel(k, len(x))
    rng = np.random.default_rng(seed)
    # a relabelling is a 0/1 vector s over the pool (1: "reference"); every block sum of the kernel is a quadratic
    # form in s, so all permutations cost one matrix product instead of a re-indexed kernel each
    n, m, big = len(x), len(y), len(pooled)
    labels = np.zeros((big, n_permutations))
    for i in range(n_permutations):
        labels[rng.permutation(big)[:n], i] = 1.0
    ks = k @ labels
    sxx_all = (labels * ks).sum(0)                  # s' K s
    sx1 = labels.T @ k.sum(1)                       # s' K 1
    syy_all = k.sum() - 2 * sx1 + sxx_all           # (1-s)' K (1-s)
    sxy = sx1 - sxx_all                             # s' K (1-s)
    tx = labels.T @ np.diag(k)
    ty = np.trace(k) - tx
    null = (sxx_all - tx) / (n * (n - 1)) + (syy_all - ty) / (m * (m - 1)) - 2 * sxy / (n * m)
    return observed, null


def mmd(reference: Any, current: Any, threshold: float = 0.05, n_permutations: int = 200, seed: int = 0,
        bandwidth: float | None = None) -> Result:
    """MMD^2 (unbiased, RBF kernel, median-heuristic bandwidth over the pooled sample; Gretton et al. 2012) with
    a permutation p-value (1 + #perm >= observed) / (1 + n_permutations); drifted when p < threshold."""
    observed, null = mmd_permutation(reference, current, n_permutations, seed, bandwidth)
    p = (int(np.sum(null >= observed)) + 1) / (n_permutations + 1)
    return Result(observed, p, threshold, p < threshold)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 25) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method; returns weights with the bias last."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    reg = np.full(xb.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(xb @ w, -30, 30)))
        grad = xb.T @ (p - y) + reg * w
        h = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg + 1e-9)
        step = np.linalg.solve(h, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = the Mann-Whitney U of the positives' scores / (n_pos n_neg), ties as half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def classifier_test(reference: Any, current: Any, threshold: float = 0.05, folds: int = 5, seed: int = 0,
                    l2: float = 1.0) -> Result:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017): a logistic regression learns to tell current rows
    from reference rows; the statistic is the cross-validated ROC-AUC of its out-of-fold scores (0.5 = the two
    samples are indistinguishable), the p-value the normal approximation of the Mann-Whitney U under the null
    (one-sided: AUC > 0.5)."""
    x0, x1 = np.asarray(reference, float), np.asarray(current, float)
    if x0.ndim == 1:
        x0, x1 = x0[:, None], x1[:, None]
    if len(x0) < folds or len(x1) < folds:
        raise DataError(f"classifier_test needs at least {folds} points in each sample")
    x = np.vstack([x0, x1])
    y = np.concatenate([np.zeros(len(x0)), np.ones(len(x1))])
    mu, sd = x.mean(0), x.std(0) + 1e-9
    x = (x - mu) / sd
    rng = np.random.default_rng(seed)
    fold = np.empty(len(x), int)
    for label in (0, 1):  # stratified folds
        idx = rng.permutation(np.flatnonzero(y == label))
        fold[idx] = np.arange(len(idx)) % folds
    scores = np.empty(len(x))
    for f in range(folds):
        train, test = fold != f, fold == f
        w = fit_logistic(x[train], y[train], l2=l2)
        scores[test] = x[test] @ w[:-1] + w[-1]
    auc = roc_auc(scores, y)
    n1, n0 = len(x1), len(x0)
    sd_auc = math.sqrt((n0 + n1 + 1) / (12 * n0 * n1))
    p = 1 - NormalDist().cdf((auc - 0.5) / sd_auc)
    return Result(auc, p, threshold, p < threshold)


TESTS = {"ks": ks, "chi2": chi2, "z_test": z_test, "wasserstein_normed": wasserstein_normed,
         "jensen_shannon": jensen_shannon, "psi": psi, "mmd": mmd, "classifier_test": classifier_test}
