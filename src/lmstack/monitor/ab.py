"""A/B tests: sticky assignment, per-arm metrics with intervals, the SRM check, fixed-horizon and sequential tests.

- :func:`assign`: SHA-256 of ``experiment`` and the user (or session) id -> a point in [0, 1) -> the arm whose share
  interval holds it; the same id always gets the same arm, and experiments are independent of each other.
- :func:`srm_check`: Pearson chi-square of the arm counts against the configured shares; flagged at p < 0.001
  (the threshold Kohavi et al. use). :func:`decide` runs it first and gives no readout when it is flagged: a broken
  split means the arms differ in more than the treatment.
- Per arm (:func:`arm_summary`): rates with Wilson intervals (:func:`lmstack.eval.stats.wilson_interval`), means
  with Student-t intervals.
- Fixed horizon: the two-proportion z-test (pooled) or Welch's t-test -- valid once, at the planned sample size.
- Sequential: the mixture SPRT (mSPRT) of Johari, Koomen, Pekelis & Walsh (2017, "Peeking at A/B tests"), normal
  mixture N(0, tau^2) over the difference: with the estimated difference d and its variance s^2 =
  var_A/n_A + var_B/n_B, Lambda = sqrt(s^2 / (s^2 + tau^2)) exp(d^2 tau^2 / (2 s^2 (s^2 + tau^2))); the always-valid
  p-value is min over looks of 1 / Lambda, so it can be read after every batch without inflating false positives.
  ``tau`` defaults to 0.1 of the pooled per-observation standard deviation (a small effect, where A/B tests live).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmstack.errors import ConfigError, DataError
from lmstack.monitor.stattests import chi2_sf, inverse_tail, normal_two_sided, two_proportion_z

SRM_P = 0.001


# ------------------------------------------------------------------------------------------ assignment

def check_shares(shares: Mapping[str, float]) -> dict[str, float]:
    if len(shares) < 2:
        raise ConfigError(f"A/B shares: need at least two arms, got {list(shares)}")
    if any((not isinstance(v, (int, float))) or v <= 0 for v in shares.values()):
        raise ConfigError(f"A/B shares: every share must be a positive number, got {dict(shares)}")
    total = float(sum(shares.values()))
    return {k: float(v) / total for k, v in shares.items()}


def parse_shares(text: str) -> dict[str, float]:
    """``"A=0.5,B=0.5"`` -> {"A": 0.5, "B": 0.5}."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"A/B shares {text!r}: write ARM=SHARE,ARM=SHARE (e.g. A=0.5,B=0.5)") from None
        if not sep or not name.strip():
            raise ConfigError(f"A/B shares {text!r}: write ARM=SHARE,ARM=SHARE (e.g. A=0.5,B=0.5)")
    return check_shares(out)


def assign(unit_id: str, experiment: str, shares: Mapping[str, float]) -> str:
    """The arm of ``unit_id`` (a user or session id) in ``experiment``: sticky and uniform over the shares."""
    shares = check_shares(shares)
    h = hashlib.sha256(f"{experiment}\x00{unit_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    acc = 0.0
    for arm, share in shares.items():
        acc += share
        if u < acc:
            return arm
    return list(shares)[-1]  # u within rounding of 1


# ------------------------------------------------------------------------------------------ distributions

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1 - math.exp(lbt) * _betacf(b, a, 1 - x) / b


def t_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if not math.isfinite(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile (q > 0.5) of Student's t, by bisection on :func:`t_two_sided`."""
    return inverse_tail(lambda x: t_two_sided(x, df), 2 * (1 - q), iterations=100)


# ------------------------------------------------------------------------------------------ tests

def srm_check(counts: Mapping[str, int], shares: Mapping[str, float], threshold: float = SRM_P) -> dict[str, Any]:
    shares = check_shares(shares)
    missing = [a for a in counts if a not in shares]
    if missing:
        raise DataError(f"SRM check: arm(s) {', '.join(map(str, missing))} have rows but no configured share")
    n = sum(counts.get(a, 0) for a in shares)
    if n == 0:
        raise DataError("SRM check: no rows in any arm")
    stat = sum((counts.get(a, 0) - n * s) ** 2 / (n * s) for a, s in shares.items())
    p = chi2_sf(stat, len(shares) - 1)
    return {"statistic": stat, "p_value": p, "flagged": p < threshold, "threshold": threshold,
            "counts": {a: int(counts.get(a, 0)) for a in shares},
            "expected": {a: n * s for a, s in shares.items()}}


def two_proportion_test(k_a: int, n_a: int, k_b: int, n_b: int) -> dict[str, Any]:
    z = two_proportion_z(k_b, n_b, k_a, n_a)  # positive when B's rate is higher
    return {"test": "two-proportion z", "statistic": z, "p_value": normal_two_sided(z),
            "effect": k_b / n_b - k_a / n_a}


def welch_t(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        raise DataError("Welch's t-test needs at least 2 observations per arm")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    t = (b.mean() - a.mean()) / se if se > 0 else 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else len(a) + len(b) - 2
    return {"test": "Welch t", "statistic": float(t), "df": float(df), "p_value": t_two_sided(t, df),
            "effect": float(b.mean() - a.mean())}


def msprt_lambda(diff: np.ndarray | float, var: np.ndarray | float, tau: float) -> np.ndarray:
    """The normal-mixture likelihood ratio of Johari et al. (2017) for an estimated difference with variance ``var``."""
    diff, var = np.asarray(diff, float), np.maximum(np.asarray(var, float), 1e-300)
    t2 = tau * tau
    return np.sqrt(var / (var + t2)) * np.exp(np.minimum(diff**2 * t2 / (2 * var * (var + t2)), 700.0))


@dataclass
class MSPRT:
    """Always-valid sequential test of B - A on a mean (a rate is the mean of 0/1 outcomes). Feed it batches
    with :meth:`update`; ``p_value`` may be read, and acted on, after every one."""
    alpha: float = 0.05
    tau: float | None = None
    sums: dict[str, list[float]] = field(default_factory=lambda: {"A": [0, 0.0, 0.0], "B": [0, 0.0, 0.0]})
    p_value: float = 1.0
    looks: int = 0

    def update(self, a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
        for arm, xs in (("A", a), ("B", b)):
            xs = np.asarray(xs, float)
            s = self.sums[arm]
            s[0] += len(xs)
            s[1] += float(xs.sum())
            s[2] += float((xs * xs).sum())
        (na, sa, qa), (nb, sb, qb) = self.sums["A"], self.sums["B"]
        self.looks += 1
        if na < 2 or nb < 2:
            return self.state()
        ma, mb = sa / na, sb / nb
        va, vb = max(qa / na - ma * ma, 0.0), max(qb / nb - mb * mb, 0.0)
        pooled = ((qa + qb) / (na + nb)) - ((sa + sb) / (na + nb)) ** 2
        tau = self.tau if self.tau is not None else 0.1 * math.sqrt(max(pooled, 1e-12))
        lam = float(msprt_lambda(mb - ma, va / na + vb / nb, tau))
        self.p_value = min(self.p_value, 1.0 / lam if lam > 0 else 1.0)
        return self.state()

    def state(self) -> dict[str, Any]:
        (na, sa, _), (nb, sb, _) = self.sums["A"], self.sums["B"]
        return {"test": "mSPRT (normal mixture)", "p_value": self.p_value, "reject": self.p_value < self.alpha,
                "looks": self.looks, "n_a": int(na), "n_b": int(nb),
                "effect": (sb / nb - sa / na) if na and nb else None}


# ------------------------------------------------------------------------------------------ readout

def _outcome(row: Mapping[str, Any], metric: str) -> float | None:
    if metric == "thumbs_up":
        from lmstack.monitor.rows import thumb

        t = thumb(dict(row))
        return None if t is None else float(t > 0)
    v = row.get(metric, (row.get("meta") or {}).get(metric))
    if isinstance(v, bool):
        return float(v)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def outcomes_by_arm(rows: Sequence[Mapping[str, Any]], metric: str) -> tuple[dict[str, list[float]], dict[str, int]]:
    """({arm: outcomes in time order}, {arm: assigned units}). The unit is the row's ``user``, else its
    ``session``, else the row itself: SRM counts what was randomised (a user with ten requests is one unit).
    A row without the metric counts for SRM, not for the metric."""
    values: dict[str, list[float]] = {}
    units: dict[str, set[Any]] = {}
    for i, r in enumerate(sorted(rows, key=lambda r: r.get("time") or 0)):
        arm = r.get("arm")
        if not isinstance(arm, str) or not arm:
            raise DataError(f"A/B row {i}: field 'arm' is missing (each row needs the arm it was served by)")
        unit = r.get("user") or r.get("session") or ("row", i)
        units.setdefault(arm, set()).add(unit)
        v = _outcome(r, metric)
        if v is not None:
            values.setdefault(arm, []).append(v)
    return values, {arm: len(u) for arm, u in units.items()}


def arm_summary(values: Sequence[float], kind: str, confidence: float = 0.95) -> dict[str, Any]:
    from lmstack.eval.stats import wilson_interval

    x = np.asarray(values, float)
    n = len(x)
    if kind == "rate":
        k = int(np.rint(x.sum()))
        lo, hi = wilson_interval(k, n, confidence) if n else (float("nan"), float("nan"))
        return {"n": n, "successes": k, "rate": k / n if n else None, "ci": [lo, hi], "interval": "Wilson"}
    mean = float(x.mean()) if n else None
    if n >= 2:
        half = t_quantile(0.5 + confidence / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
        ci = [mean - half, mean + half]
    else:
        ci = [None, None]
    return {"n": n, "mean": mean, "ci": ci, "interval": "Student t"}


def decide(rows: Sequence[Mapping[str, Any]], metric: str, kind: str = "rate",
           shares: Mapping[str, float] | None = None, control: str = "A", treatment: str = "B",
           alpha: float = 0.05, higher_is_better: bool = True,
           look_every: int = 100, tau: float | None = None) -> dict[str, Any]:
    """Readout of an experiment: SRM first, then per-arm summaries, the fixed-horizon test, the sequential test
    replayed over the rows in time order (a look every ``look_every`` rows per arm), and a recommendation with
    its reasoning."""
    if kind not in ("rate", "mean"):
        raise ConfigError(f"A/B metric kind {kind!r}: use rate or mean")
    values, counts = outcomes_by_arm(rows, metric)
    shares = check_shares(shares or {control: 0.5, treatment: 0.5})
    for arm in (control, treatment):
        if arm not in shares:
            raise ConfigError(f"A/B: arm {arm!r} has no share in {dict(shares)}")
    srm = srm_check(counts, shares)
    out: dict[str, Any] = {"metric": metric, "kind": kind, "control": control, "treatment": treatment,
                           "alpha": alpha, "srm": srm}
    if srm["flagged"]:
        out.update(recommendation="investigate: sample ratio mismatch",
                   reasoning=(f"The split is broken: {srm['counts']} against expected "
                              f"{ {a: round(e, 1) for a, e in srm['expected'].items()} } (chi-square p = "
                              f"{srm['p_value']:.2g} < {SRM_P}). Assignment or logging loses rows unevenly, so the "
                              "arms differ by more than the treatment; no readout until it is fixed."))
        return out
    a, b = values.get(control, []), values.get(treatment, [])
    if len(a) < 2 or len(b) < 2:
        raise DataError(f"A/B: metric {metric!r} needs at least 2 outcomes per arm, got {control}={len(a)}, "
                        f"{treatment}={len(b)}")
    out["arms"] = {arm: arm_summary(values.get(arm, []), kind) for arm in shares}
    fixed = (two_proportion_test(int(sum(a)), len(a), int(sum(b)), len(b)) if kind == "rate" else welch_t(a, b))
    seq = MSPRT(alpha=alpha, tau=tau)
    for i in range(0, max(len(a), len(b)), look_every):
        seq.update(a[i:i + look_every], b[i:i + look_every])
    out["fixed_horizon"] = fixed
    out["sequential"] = seq.state()
    effect = fixed["effect"]
    better = (effect > 0) == higher_is_better
    what = "rate" if kind == "rate" else "mean"
    detail = (f"{treatment} - {control} {what} = {effect:+.4g}; fixed-horizon {fixed['test']} "
              f"p = {fixed['p_value']:.3g}; "
              f"always-valid mSPRT p = {seq.p_value:.3g} after {seq.looks} looks; SRM p = {srm['p_value']:.3g} (ok).")
    if seq.p_value < alpha:
        rec = f"ship {treatment}" if better else f"keep {control}"
        why = (f"The sequential test rejects no difference at alpha = {alpha} ({treatment} is "
               f"{'better' if better else 'worse'}); it stays valid although the results were looked at along the way.")
    elif fixed["p_value"] < alpha:
        rec = "keep collecting"
        why = ("Only the fixed-horizon test is significant; it is valid only at the planned sample size, read once. "
               "The always-valid test is not yet convinced: keep the experiment running.")
    else:
        rec = "keep collecting"
        why = "Neither test finds a difference yet; more data (or a larger effect) is needed."
    out.update(recommendation=rec, reasoning=f"{why} {detail}")
    return out


# ------------------------------------------------------------------------------------------ simulation

def simulate_peeking(n_experiments: int = 2000, looks: int = 20, batch: int = 200, p_a: float = 0.1,
                     p_b: float = 0.1, alpha: float = 0.05, tau: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Many simulated experiments on 0/1 outcomes, a look after every batch of ``batch`` per arm: the share where
    naive peeking (a fixed-horizon z-test at every look, stop at the first p < alpha) rejects, where the mSPRT
    rejects, and where a single fixed-horizon test at the end rejects. Under p_a == p_b these are false-positive
    rates; otherwise power. Vectorised over experiments; seeded."""
    rng = np.random.default_rng(seed)
    ka = np.cumsum(rng.binomial(batch, p_a, (n_experiments, looks)), 1).astype(float)
    kb = np.cumsum(rng.binomial(batch, p_b, (n_experiments, looks)), 1).astype(float)
    n = batch * np.arange(1, looks + 1, dtype=float)[None, :]
    ra, rb = ka / n, kb / n
    pooled = (ka + kb) / (2 * n)
    se = np.sqrt(np.maximum(pooled * (1 - pooled) * (2 / n), 1e-300))
    z = (rb - ra) / se
    p_naive = np.vectorize(normal_two_sided)(z)
    var = ra * (1 - ra) / n + rb * (1 - rb) / n
    t = tau if tau is not None else 0.1 * np.sqrt(np.maximum(pooled * (1 - pooled), 1e-12))
    lam = msprt_lambda(rb - ra, var, t)
    p_seq = np.minimum.accumulate(np.minimum(1.0, 1.0 / lam), axis=1)
    return {"experiments": n_experiments, "looks": looks, "batch": batch, "p_a": p_a, "p_b": p_b, "alpha": alpha,
            "naive_peeking": float(np.mean((p_naive < alpha).any(1))),
            "msprt": float(np.mean(p_seq[:, -1] < alpha)),
            "fixed_once": float(np.mean(p_naive[:, -1] < alpha)),
            "msprt_mean_stop_look": float(np.mean(np.where((p_seq < alpha).any(1), (p_seq < alpha).argmax(1) + 1,
                                                           np.nan)[(p_seq < alpha).any(1)]))
            if (p_seq < alpha).any() else None}
