"""lmstack.monitor.ab: sticky assignment, SRM, interval and test parity, and the peeking simulation."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.monitor import ab

scipy_stats = pytest.importorskip("scipy.stats")


def test_assignment_is_sticky_and_matches_shares():
    shares = {"A": 0.8, "B": 0.2}
    arms = [ab.assign(f"user{i}", "exp1", shares) for i in range(20000)]
    assert arms == [ab.assign(f"user{i}", "exp1", shares) for i in range(20000)]
    frac = Counter(arms)["B"] / len(arms)
    assert abs(frac - 0.2) < 0.01
    other = [ab.assign(f"user{i}", "exp2", shares) for i in range(20000)]
    assert sum(a != b for a, b in zip(arms, other)) > 5000  # experiments are independent


def test_srm_check_matches_scipy_and_flags_a_broken_split():
    ok = ab.srm_check({"A": 5030, "B": 4970}, {"A": 0.5, "B": 0.5})
    sc = scipy_stats.chisquare([5030, 4970], [5000, 5000])
    assert ok["statistic"] == pytest.approx(sc.statistic, abs=1e-9)
    assert ok["p_value"] == pytest.approx(sc.pvalue, abs=1e-9) and not ok["flagged"]
    bad = ab.srm_check({"A": 5200, "B": 4800}, {"A": 0.5, "B": 0.5})
    assert bad["p_value"] < 0.001 and bad["flagged"]
    three = ab.srm_check({"A": 100, "B": 210, "C": 90}, {"A": 1, "B": 2, "C": 1})
    assert three["p_value"] == pytest.approx(scipy_stats.chisquare([100, 210, 90], [100, 200, 100]).pvalue, abs=1e-9)


def test_welch_and_t_interval_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 40), rng.normal(0.4, 2, 55)
    w = ab.welch_t(a, b)
    ref = scipy_stats.ttest_ind(b, a, equal_var=False)
    assert w["statistic"] == pytest.approx(ref.statistic, abs=1e-9)
    assert w["p_value"] == pytest.approx(ref.pvalue, abs=1e-9)
    s = ab.arm_summary(a, "mean")
    lo, hi = scipy_stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=scipy_stats.sem(a))
    assert s["ci"] == pytest.approx([lo, hi], abs=1e-7)
    for df in (1, 3, 10, 100):
        assert ab.t_two_sided(1.7, df) == pytest.approx(2 * scipy_stats.t.sf(1.7, df), abs=1e-10)


def test_rate_summary_uses_wilson():
    from lmstack.eval.stats import wilson_interval

    s = ab.arm_summary([1] * 30 + [0] * 70, "rate")
    assert s["rate"] == 0.3 and s["ci"] == list(wilson_interval(30, 100))


def test_two_proportion_test_matches_hand_computation():
    r = ab.two_proportion_test(30, 100, 45, 100)  # B - A
    assert r["statistic"] == pytest.approx(2.190890, abs=1e-6) and r["p_value"] == pytest.approx(0.028459, abs=1e-6)


def test_msprt_lambda_is_the_normal_mixture_ratio():
    # closed form vs numerical integration of N(d; delta, v) N(delta; 0, tau^2) d delta / N(d; 0, v)
    d, v, tau = 0.03, 0.0004, 0.02
    grid = np.linspace(-0.5, 0.5, 200001)
    num = np.trapezoid(np.exp(-(d - grid) ** 2 / (2 * v)) / math.sqrt(2 * math.pi * v)
                       * np.exp(-grid**2 / (2 * tau**2)) / math.sqrt(2 * math.pi * tau**2), grid)
    den = math.exp(-d * d / (2 * v)) / math.sqrt(2 * math.pi * v)
    assert float(ab.msprt_lambda(d, v, tau)) == pytest.approx(num / den, rel=1e-6)


def test_peeking_simulation_sequential_stays_valid_naive_inflates():
    null = ab.simulate_peeking(n_experiments=1500, looks=20, batch=200, p_a=0.1, p_b=0.1, seed=0)
    slack = 3 * math.sqrt(0.05 * 0.95 / 1500)
    assert null["msprt"] <= 0.05 + slack
    assert null["naive_peeking"] > 0.15  # ~25% with 20 looks
    assert abs(null["fixed_once"] - 0.05) < slack
    power = ab.simulate_peeking(n_experiments=500, looks=20, batch=200, p_a=0.10, p_b=0.13, seed=1)
    assert power["msprt"] > 0.8


def _rows(n, p_a, p_b, seed, drop_b=0.0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arm = ab.assign(f"u{i}", "exp", {"A": 0.5, "B": 0.5})
        if arm == "B" and rng.random() < drop_b:
            continue  # a logging bug that loses B rows: SRM
        out.append({"user": f"u{i}", "arm": arm, "time": float(i),
                    "converted": int(rng.random() < (p_a if arm == "A" else p_b))})
    return out


def test_decide_ships_a_real_effect_and_stops_on_srm():
    out = ab.decide(_rows(8000, 0.10, 0.14, seed=0), "converted", "rate", {"A": 0.5, "B": 0.5})
    assert out["recommendation"] == "ship B" and out["sequential"]["reject"]
    assert "always-valid mSPRT p" in out["reasoning"] and "SRM p" in out["reasoning"]
    null = ab.decide(_rows(4000, 0.10, 0.10, seed=1), "converted", "rate")
    assert null["recommendation"] == "keep collecting"
    broken = ab.decide(_rows(8000, 0.10, 0.14, seed=0, drop_b=0.1), "converted", "rate")
    assert broken["srm"]["flagged"] and broken["recommendation"] == "investigate: sample ratio mismatch"
    assert "arms" not in broken  # no readout on a broken split


def test_bad_inputs():
    with pytest.raises(LmstackError, match="ARM=SHARE"):
        ab.parse_shares("A:0.5")
    with pytest.raises(LmstackError, match="field 'arm' is missing"):
        ab.decide([{"converted": 1}], "converted")
    with pytest.raises(LmstackError, match="at least two arms"):
        ab.check_shares({"A": 1.0})


def test_msprt_class_matches_the_vectorised_simulation():
    rng = np.random.default_rng(7)
    a = (rng.random(2000) < 0.1).astype(float)
    b = (rng.random(2000) < 0.12).astype(float)
    seq = ab.MSPRT()
    ps = [seq.update(a[i:i + 200], b[i:i + 200])["p_value"] for i in range(0, 2000, 200)]
    # the same formula by hand at every look, running minimum of 1 / Lambda
    want, best = [], 1.0
    for k in range(1, 11):
        xa, xb = a[:200 * k], b[:200 * k]
        var = xa.var() / len(xa) + xb.var() / len(xb)
        pooled = np.concatenate([xa, xb]).var()
        best = min(best, 1 / float(ab.msprt_lambda(xb.mean() - xa.mean(), var, 0.1 * math.sqrt(pooled))))
        want.append(best)
    assert ps == pytest.approx(want, rel=1e-9)
    assert all(x >= y for x, y in itertools.pairwise(ps))  # always-valid p-values never go up


def test_srm_counts_users_not_requests():
    rows = []
    for i in range(1000):
        arm = ab.assign(f"u{i}", "exp", {"A": 0.5, "B": 0.5})
        for k in range(5 if arm == "B" else 1):  # B users send more requests: not a broken split
            rows.append({"user": f"u{i}", "arm": arm, "time": float(i * 10 + k), "converted": k % 2})
    values, counts = ab.outcomes_by_arm(rows, "converted")
    assert sum(counts.values()) == 1000 and len(values["B"]) > 4 * len(values["A"])
    assert not ab.decide(rows, "converted")["srm"]["flagged"]
