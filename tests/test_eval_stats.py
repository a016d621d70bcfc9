"""Bootstrap intervals and paired significance: BLEU resampling from sufficient statistics, test behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from lmstack.errors import DataError
from lmstack.eval import compute_metric
from lmstack.eval.metrics.base import MetricResult
from lmstack.eval.stats import bootstrap_ci, paired_bootstrap, paired_permutation


def test_corpus_from_recomputes_bleu_exactly(shared_data):
    sacrebleu = pytest.importorskip("sacrebleu")
    base = shared_data / "eval" / "mt" / "wmt17_en_de"
    ref = (base / "newstest2017-ende.ref.de").read_text(encoding="utf-8").splitlines()[:200]
    sys_a = sorted((base / "systems").glob("*.de"))[0].read_text(encoding="utf-8").splitlines()[:200]
    res = compute_metric("bleu", sys_a, ref)
    idx = np.random.default_rng(3).integers(0, 200, 200)
    expected = sacrebleu.corpus_bleu([sys_a[i] for i in idx], [[ref[i] for i in idx]]).score
    assert res.corpus_from(idx) == pytest.approx(expected, abs=1e-9)
    low, high = bootstrap_ci(res, n_resamples=200)
    assert low < res.score < high


def _result(values, name="m") -> MetricResult:
    return MetricResult(name, float(np.mean(values)), list(map(float, values)))


def test_paired_tests_detect_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    base = rng.random(300)
    a = _result(base)
    better = _result(base + 0.05 + rng.normal(0, 0.02, 300))
    same = _result(base + rng.normal(0, 0.02, 300))
    assert paired_permutation(a, better)["p_value"] < 0.01
    assert paired_bootstrap(a, better)["b_better"]
    assert paired_permutation(a, same, seed=1)["p_value"] > 0.05
    assert not paired_bootstrap(a, same)["b_better"]


def test_paired_needs_same_items():
    with pytest.raises(DataError, match="same items"):
        paired_bootstrap(_result([1, 2]), _result([1, 2, 3]))


def test_correlations_match_scipy_and_levels():
    stats = pytest.importorskip("scipy.stats")
    from lmstack.eval.correlate import correlate, kendall, pearson, spearman

    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 120).astype(float)          # many ties, as Likert ratings have
    y = x + rng.normal(0, 1.5, 120).round(1)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert kendall(x, y) == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)   # tau-b
    groups = np.repeat(np.arange(12), 10)
    summary = correlate(y, x, groups=groups, level="summary")
    expected = np.mean([stats.spearmanr(y[groups == g], x[groups == g])[0] for g in range(12)])
    assert summary["spearman"] == pytest.approx(expected, abs=1e-12) and summary["units"] == 12
    systems = np.tile(np.arange(10), 12)
    system = correlate(y, x, systems=systems, level="system")
    means = [(y[systems == s].mean(), x[systems == s].mean()) for s in range(10)]
    assert system["kendall"] == pytest.approx(stats.kendalltau(*zip(*means))[0], abs=1e-12)
