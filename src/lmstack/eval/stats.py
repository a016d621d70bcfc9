"""Confidence intervals and significance for metric scores.

- :func:`bootstrap_ci`: percentile bootstrap over items (Efron); the corpus score is recomputed on each
  resample from the metric's sufficient statistics, so BLEU's interval is BLEU's, not a mean's.
- :func:`paired_bootstrap`: Koehn (2004): resample the same items for both systems; report the mean
  difference, its interval and the share of resamples where the sign of the observed difference flips.
- :func:`paired_permutation`: approximate randomisation (Noreen 1989; Riezler & Maxwell 2005): swap the
  two systems' outputs item by item at random; two-sided p = (#|delta*| >= |delta| + 1) / (n + 1).
- :func:`wilson_interval`: the Wilson score interval of a pass rate or attack success rate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lmstack.errors import DataError
from lmstack.eval.metrics.base import MetricResult


def _n(result: MetricResult) -> int:
    return len(result.per_item)


def bootstrap_ci(result: MetricResult, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the corpus score (items resampled with replacement)."""
    n = _n(result)
    if n == 0:
        raise DataError("bootstrap_ci: no items")
    rng = np.random.default_rng(seed)
    scores = np.array([result.corpus_from(rng.integers(0, n, n)) for _ in range(n_resamples)])
    scores = scores[np.isfinite(scores)]
    alpha = (1 - confidence) / 2
    return float(np.quantile(scores, alpha)), float(np.quantile(scores, 1 - alpha))


def _check_pair(a: MetricResult, b: MetricResult) -> None:
    if _n(a) != _n(b):
        raise DataError(f"paired test: the systems have {_n(a)} and {_n(b)} items; pair them on the same items")
    if a.name != b.name:
        raise DataError(f"paired test: different metrics {a.name!r} and {b.name!r}")


def paired_bootstrap(a: MetricResult, b: MetricResult, n_resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, Any]:
    """Is system ``b`` better than ``a``? Same resampled items for both; the score direction is the metric's."""
    _check_pair(a, b)
    n = _n(a)
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_resamples)
    for k in range(n_resamples):
        idx = rng.integers(0, n, n)
        deltas[k] = b.corpus_from(idx) - a.corpus_from(idx)
    observed = b.score - a.score
    flips = float(np.mean(deltas <= 0) if observed > 0 else np.mean(deltas >= 0))
    alpha = (1 - confidence) / 2
    sign = 1 if a.higher_is_better else -1
    return {"delta": observed, "ci": (float(np.quantile(deltas, alpha)), float(np.quantile(deltas, 1 - alpha))),
            "p_value": flips, "b_better": bool(sign * observed > 0 and flips < 1 - confidence),
            "n_resamples": n_resamples}


def paired_permutation(a: MetricResult, b: MetricResult, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Approximate randomisation test of the corpus-score difference (two-sided)."""
    _check_pair(a, b)
    n = _n(a)
    rng = np.random.default_rng(seed)
    observed = b.score - a.score
    if a.item_stats is not None and a.aggregate is not None and b.item_stats is not None:
        sa, sb, agg = a.item_stats, b.item_stats, a.aggregate

        def delta(swap: np.ndarray) -> float:
            x = np.where(swap[:, None], sb, sa)
            y = np.where(swap[:, None], sa, sb)
            return agg(y) - agg(x)
        count = sum(abs(delta(rng.random(n) < 0.5)) >= abs(observed) - 1e-12 for _ in range(n_resamples))
    else:
        va, vb = np.asarray(a.per_item, float), np.asarray(b.per_item, float)
        diff = vb - va                                                          # swapping flips an item's sign
        signs = np.where(rng.random((n_resamples, n)) < 0.5, -1.0, 1.0)
        perm = (signs * diff).mean(axis=1)
        count = int(np.sum(np.abs(perm) >= abs(diff.mean()) - 1e-12))
    return {"delta": observed, "p_value": (count + 1) / (n_resamples + 1), "n_resamples": n_resamples}


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it
    over the normal interval, which collapses to a point at 0 or n successes, the common case for small n).

        centre = (p + z^2 / 2n) / (1 + z^2 / n),  half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..{n}, got {successes}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))
