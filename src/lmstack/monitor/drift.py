"""Windowed drift detection with a seasonal reference, calibrated thresholds and alert hysteresis.

The current rows are cut into windows of ``window_s`` (default one hour). Each window is compared, signal by
signal (:mod:`lmstack.monitor.rows`), with a reference sample:

- ``reference="seasonal"`` (default): the reference-period windows at the same phase of the period -- the same
  hour of the week, or of the day (``period``: ``"week"``, ``"day"``, seconds, or ``"auto"``: a week when the
  reference spans two weeks or more, else a day) -- so a daily or weekly cycle is not drift;
- ``reference="previous"``: the window just before (the naive baseline, kept for the bench);
- ``reference="all"``: the whole reference with Evidently's default thresholds, uncalibrated (``mode="static"``,
  below: what a drift tool does out of the box).

Thresholds are calibrated on the reference period, not read off a p-value (on thousands of rows every p-value
is tiny): each reference window is compared with *its* matched reference (the other windows at its phase, or
the window before it) exactly as a current window will be, and the threshold of a signal is the ``1 - alpha``
quantile of those held-out statistics -- a target per-window false-alarm rate of ``alpha``. What is calibrated is a
size-adjusted score (the statistic times its null rate in the sample sizes, see :meth:`_Stats.compute`), so one
threshold serves a busy hour and a quiet night; a window is drifted when its score exceeds the threshold and the
raw statistic is at least Evidently's default (0.1, or |z| 1.96): large enough to matter. An alert on a signal
needs ``consecutive`` drifted windows in a row and clears after ``clear_after`` clean ones
(:class:`lmstack.monitor.alerts.AlertEngine`).

Window statistics: numeric signals (lengths, sentiment, OOV rate, latency, judge score) the Wasserstein distance
normed by the reference's std; rates (refusal, safety, feedback, thumbs-up) the two-proportion |z|; the topic
mix the Jensen-Shannon distance of cluster shares; the input embedding the unbiased MMD^2 with an RBF kernel
(bandwidth: the median heuristic on the reference, fixed) or the classifier two-sample AUC.

Too little reference to calibrate (fewer than two periods for seasonal, fewer than 8 windows for previous):
``mode="static"`` -- every current window against the whole reference with Evidently's default tests: for a
reference of <= 1000 rows KS (numeric) and chi-square (topic), for a larger one Wasserstein 0.1 and
Jensen-Shannon 0.1; the two-proportion z for rates, the MMD permutation test for embeddings. The p-value tests
share Evidently's 0.05 over the signals (Bonferroni: 0.05 / number of signals each). An alert needs
``min(consecutive, number of current windows)`` drifted windows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from statistics import NormalDist
from typing import Any

import numpy as np

from lmstack.errors import ConfigError, LmstackError
from lmstack.monitor import stattests
from lmstack.monitor.alerts import AlertEngine, Rule, alert_intervals, window_index
from lmstack.monitor.rows import SIGNALS, Embed, compute_signals, embed_rows, fit_context, hashed_embed, normalize_rows

KIND = {"topic_novelty": "numeric", "input_len": "numeric", "output_len": "numeric", "sentiment": "numeric",
        "oov_rate": "numeric",
        "latency_s": "numeric", "judge_score": "numeric", "refusal": "rate", "safety": "rate", "feedback": "rate",
        "thumbs_up": "rate", "topic": "categorical", "embedding": "embedding"}
STATIC_THRESHOLD = {"numeric": 0.1, "rate": 1.959963984540054, "categorical": 0.1}
PERIODS = {"day": 86400.0, "week": 7 * 86400.0}
DEFAULT_TEST = {"numeric": "wasserstein_normed", "rate": "two_proportion_z", "categorical": "jensen_shannon"}
STATIC_P = 0.05  # Evidently's p-value threshold, shared by the signals of a static report
EVIDENTLY_SMALL = 1000  # Evidently tests references up to this size with KS / chi-square, larger ones by distance
MIN_RATE_ROWS = 5  # a rate window with fewer rows carrying it (thumbs) has no statistic


@dataclass
class DriftConfig:
    window_s: float = 3600.0
    period: str | float = "auto"
    reference: str = "seasonal"
    alpha: float = 0.01
    consecutive: int = 3
    clear_after: int = 3
    signals: tuple[str, ...] | None = None
    min_rows: int = 10
    max_window_rows: int = 200
    embedding_test: str = "mmd"
    n_topics: int = 8
    seed: int = 0
    severity: str = "warning"
    reference_window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ConfigError(f"drift config: window_s must be > 0 seconds, got {self.window_s}")
        if self.reference not in ("seasonal", "previous", "all"):
            raise ConfigError(f"drift config: reference {self.reference!r}: use seasonal, previous or all")
        if isinstance(self.period, str) and self.period not in ("auto", *PERIODS):
            raise ConfigError(f"drift config: period {self.period!r}: use auto, day, week or seconds")
        if not isinstance(self.period, str) and not self.period >= self.window_s:
            raise ConfigError(f"drift config: period ({self.period} s) must be at least window_s ({self.window_s} s)")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"drift config: alpha must be in (0, 1), got {self.alpha}")
        if self.consecutive < 1 or self.clear_after < 1:
            raise ConfigError("drift config: consecutive and clear_after must be >= 1")
        if self.embedding_test not in ("mmd", "classifier", "none"):
            raise ConfigError(f"drift config: embedding_test {self.embedding_test!r}: use mmd, classifier or none")
        if self.signals is not None:
            bad = [s for s in self.signals if s not in SIGNALS]
            if bad:
                raise ConfigError(f"drift config: unknown signal(s) {', '.join(bad)}; known: {', '.join(SIGNALS)}")
        if self.min_rows < 2:
            raise ConfigError(f"drift config: min_rows must be >= 2, got {self.min_rows}")


def config_from_dict(d: Mapping[str, Any] | None) -> DriftConfig:
    d = dict(d or {})
    names = {f.name for f in fields(DriftConfig)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"drift config: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(names))}")
    for key in ("window_s", "alpha"):
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], (int, float))):
            raise ConfigError(f"drift config: {key} must be a number, got {d[key]!r}")
    for key in ("consecutive", "clear_after", "min_rows", "max_window_rows", "n_topics", "seed"):
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], int)):
            raise ConfigError(f"drift config: {key} must be an integer, got {d[key]!r}")
    if "period" in d and not isinstance(d["period"], str) and (isinstance(d["period"], bool)
                                                             or not isinstance(d["period"], (int, float))):
        raise ConfigError(f"drift config: period must be auto, day, week or seconds, got {d['period']!r}")
    if d.get("signals") is not None:
        if isinstance(d["signals"], str) or not isinstance(d["signals"], (list, tuple)):
            raise ConfigError(f"drift config: signals must be a list of signal names, got {d['signals']!r}")
        d["signals"] = tuple(d["signals"])
    if d.get("reference_window") is not None:
        rw = d["reference_window"]
        if not (isinstance(rw, (list, tuple)) and len(rw) == 2):
            raise ConfigError("drift config: reference_window must be [start, end] (unix seconds or ISO 8601)")
        from lmstack.monitor.rows import parse_time

        d["reference_window"] = (parse_time(rw[0], "drift config reference_window[0]"),
                                 parse_time(rw[1], "drift config reference_window[1]"))
    try:
        return DriftConfig(**d)
    except TypeError as e:
        raise ConfigError(f"drift config: {e}") from None


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%MZ")


def _groups(idx: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(idx, kind="stable")
    keys, starts = np.unique(idx[order], return_index=True)
    return {int(k): order[s:e] for k, s, e in zip(keys, starts, list(starts[1:]) + [len(order)])}


class _Stats:
    """The window statistic of every signal, given row indices into the reference and current arrays."""

    def __init__(self, ref: dict[str, np.ndarray], cur: dict[str, np.ndarray], signals: Sequence[str],
                 config: DriftConfig, bandwidth: float):
        self.ref, self.cur, self.signals, self.cfg, self.bw = ref, cur, signals, config, bandwidth

    def _sub(self, idx: np.ndarray, salt: int) -> np.ndarray:
        m = self.cfg.max_window_rows
        if len(idx) <= m:
            return idx
        return np.sort(np.random.default_rng(self.cfg.seed * 1_000_003 + salt).choice(idx, m, replace=False))

    def compute(self, pool: tuple[str, np.ndarray], window: tuple[str, np.ndarray], salt: int,
                static: bool = False) -> dict[str, dict[str, Any]]:
        """{signal: {"statistic": raw, "score": size-adjusted}}: the score scales the raw statistic by its null
        rate in the sample sizes (sqrt(n_eff) for Wasserstein and Jensen-Shannon, n_eff for MMD^2, |z| as is;
        n_eff = n_a n_b / (n_a + n_b)), so one calibrated threshold serves a busy hour and a quiet night."""
        (ps, pidx), (ws, widx) = pool, window
        P, W = (self.ref if ps == "ref" else self.cur), (self.ref if ws == "ref" else self.cur)
        out: dict[str, dict[str, Any]] = {}
        # static tests share a 5% false-alarm rate over the signals (Bonferroni), so a report of a dozen signals
        # on undrifted data is not drifted one time in two
        level = STATIC_P / max(1, len(self.signals))
        for s in self.signals:
            kind = KIND[s]
            if kind == "embedding":
                a, b = P[s][self._sub(pidx, salt)], W[s][self._sub(widx, salt + 7)]
                n_eff = len(a) * len(b) / (len(a) + len(b))
                if self.cfg.embedding_test == "classifier":
                    r = stattests.classifier_test(a, b, seed=self.cfg.seed + salt)
                    sd = math.sqrt((len(a) + len(b) + 1) / (12 * len(a) * len(b)))
                    out[s] = {"statistic": r.statistic, "score": (r.statistic - 0.5) / sd}
                    if static:
                        out[s]["threshold"] = 0.5 + NormalDist().inv_cdf(1 - level) * sd
                elif static:
                    n_perm = max(100, math.ceil(2 / level))
                    obs, null = stattests.mmd_permutation(a, b, n_perm, self.cfg.seed + salt, self.bw)
                    out[s] = {"statistic": obs, "score": obs * n_eff,
                              "threshold": float(np.quantile(null, 1 - level, method="higher"))}
                else:
                    obs = stattests.mmd2(a, b, self.bw)
                    out[s] = {"statistic": obs, "score": obs * n_eff}
                continue
            a, b = P[s][pidx], W[s][widx]
            a, b = a[~np.isnan(a)], b[~np.isnan(b)]
            if kind == "rate":
                if len(a) < MIN_RATE_ROWS or len(b) < MIN_RATE_ROWS:
                    continue
                stat = abs(stattests.two_proportion_z(int(a.sum()), len(a), int(b.sum()), len(b)))
                out[s] = {"statistic": stat, "score": stat}
                if static:
                    out[s]["threshold"] = NormalDist().inv_cdf(1 - level / 2)
                continue
            if len(a) == 0 or len(b) == 0:
                continue
            if static and len(a) <= EVIDENTLY_SMALL:
                # Evidently's choice for a reference of <= 1000 rows: KS (numeric) or chi-square (categories),
                # at the p-value level, expressed as the statistic's critical value
                if kind == "numeric":
                    out[s] = {"statistic": stattests.ks_statistic(a, b), "test": "ks",
                              "threshold": stattests.ks_critical(len(a), len(b), level)}
                else:
                    df = len(set(a.tolist()) | set(b.tolist())) - 1
                    out[s] = {"statistic": stattests.chi2(a, b).statistic, "test": "chi2",
                              "threshold": stattests.chi2_isf(level, df) if df >= 1 else math.inf}
                out[s]["score"] = out[s]["statistic"]
                continue
            if kind == "numeric":
                stat = stattests.wasserstein(a, b) / max(float(np.std(a)), 0.001)
            else:
                r, c = stattests.binned_shares(a, b, categorical=True)
                stat = stattests.js_distance(r, c)
            out[s] = {"statistic": float(stat), "score": float(stat) * math.sqrt(len(a) * len(b) / (len(a) + len(b)))}
        return out


def _period(config: DriftConfig, span: float) -> float:
    if isinstance(config.period, str):
        if config.period == "auto":
            return PERIODS["week"] if span >= 14 * 86400 else PERIODS["day"]
        return PERIODS[config.period]
    return float(config.period)


def drift_report(reference_rows: Sequence[Any], current_rows: Sequence[Any],
                 config: DriftConfig | Mapping | None = None, embed: Embed | None = None,
                 sinks: Sequence[Any] = ()) -> dict[str, Any]:
    """Per-window, per-signal drift statistics of ``current_rows`` against ``reference_rows``, their calibrated
    thresholds, and the alerts (see the module docstring); alert events also go to ``sinks``
    (:mod:`lmstack.monitor.alerts`). Returns a JSON-ready dict."""
    cfg = config if isinstance(config, DriftConfig) else config_from_dict(config)
    ref_rows = normalize_rows(reference_rows)
    if cfg.reference_window is not None:
        lo, hi = cfg.reference_window
        ref_rows = [r for r in ref_rows if lo <= r["time"] < hi]
        if not ref_rows:
            raise LmstackError(f"drift config: the reference window [{iso(lo)}, {iso(hi)}) has no rows: widen "
                               "reference_window or check the reference file's times")
    if not ref_rows:
        raise LmstackError("drift: the reference has no rows (give a reference period of logged interactions)")
    cur_rows = normalize_rows(current_rows)
    if not cur_rows:
        raise LmstackError("drift: the current period has no rows")

    embed = embed or hashed_embed
    ref_emb = embed_rows(ref_rows, embed)  # once: for the topic model and the signals
    ctx = fit_context(ref_rows, embed, cfg.n_topics, cfg.seed, embeddings=ref_emb)
    ref = compute_signals(ref_rows, ctx, reference=True, embeddings=ref_emb)
    cur = compute_signals(cur_rows, ctx)
    signals = [s for s in (cfg.signals or SIGNALS) if s in ref
               and not (s == "embedding" and cfg.embedding_test == "none")]
    if cfg.signals:
        missing = [s for s in cfg.signals if s not in ref]
        if missing:
            raise ConfigError(f"drift config: signal(s) {', '.join(missing)} are absent from the reference rows "
                              "(no latency, thumbs or judge scores there)")
    rng = np.random.default_rng(cfg.seed)
    sample = ref["embedding"][rng.choice(len(ref_rows), min(500, len(ref_rows)), replace=False)]
    stats = _Stats(ref, cur, signals, cfg, stattests.median_bandwidth(sample))

    rt = np.array([r["time"] for r in ref_rows])
    ref_groups = {w: i for w, i in _groups(window_index(rt, cfg.window_s)).items() if len(i) >= cfg.min_rows}
    cur_groups = _groups(window_index(np.array([r["time"] for r in cur_rows]), cfg.window_s))
    if not ref_groups:
        raise LmstackError(f"drift: no reference window of {cfg.window_s:g} s has {cfg.min_rows} rows "
                           "(lower min_rows or give more reference rows)")
    period = _period(cfg, float(rt.max() - rt.min()))
    per_period = max(1, round(period / cfg.window_s))

    def phase(w: int) -> int:
        return w % per_period

    by_phase: dict[int, list[int]] = {}
    for w in sorted(ref_groups):
        by_phase.setdefault(phase(w), []).append(w)
    note = ""
    if cfg.reference == "seasonal":
        mode = "seasonal" if max(len(v) for v in by_phase.values()) >= 2 else "static"
        if mode == "static":
            note = (f"the reference covers less than two {period / 3600:g} h periods: no calibration, each window "
                    "against the whole reference with Evidently's default thresholds")
    elif cfg.reference == "previous":
        mode = "previous" if len(ref_groups) >= 8 else "static"
        if mode == "static":
            note = "fewer than 8 reference windows: no calibration, Evidently's default thresholds"
    else:
        mode = "static"
        note = "reference=all: each window against the whole reference with Evidently's default thresholds"

    # calibration: every reference window against its own matched reference
    thresholds: dict[str, float] = {}
    calib: dict[str, list[float]] = {s: [] for s in signals}
    if mode != "static":
        ref_ws = sorted(ref_groups)
        for j, w in enumerate(ref_ws):
            if mode == "seasonal":
                others = [v for v in by_phase[phase(w)] if v != w]
                if not others:
                    continue
                pool = np.concatenate([ref_groups[v] for v in others])
            else:
                if j == 0:
                    continue
                pool = ref_groups[ref_ws[j - 1]]
            for s, v in stats.compute(("ref", pool), ("ref", ref_groups[w]), salt=w).items():
                calib[s].append(v["score"])
        for s in signals:
            vals = calib[s]
            if len(vals) >= 5:
                thresholds[s] = float(np.quantile(vals, 1 - cfg.alpha, method="higher"))
                if KIND[s] == "rate":  # score == raw |z| there: show the floor in the threshold itself
                    thresholds[s] = max(thresholds[s], STATIC_THRESHOLD["rate"])

    first, last = min(cur_groups), max(cur_groups)
    n_windows = last - first + 1
    need = cfg.consecutive if mode != "static" else min(cfg.consecutive, n_windows)
    windows: list[dict[str, Any]] = []
    all_ref = np.concatenate(list(ref_groups.values()))
    last_ref_w = max(ref_groups)
    prev: tuple[str, np.ndarray] = ("ref", ref_groups[last_ref_w])
    per_signal_thr: dict[str, list[float]] = {s: [] for s in signals}
    for w in range(first, last + 1):
        idx = cur_groups.get(w, np.zeros(0, int))
        rec: dict[str, Any] = {"start": w * cfg.window_s, "n": len(idx), "statistics": {}, "drifted": []}
        if len(idx) < cfg.min_rows:
            rec["skipped"] = f"fewer than {cfg.min_rows} rows"
            windows.append(rec)
            continue
        if mode == "seasonal":
            matched = by_phase.get(phase(w))
            if not matched:
                raise LmstackError(
                    f"drift: the reference window for {iso(w * cfg.window_s)} (phase {phase(w)} of a "
                    f"{period / 3600:g} h period: {iso(w * cfg.window_s)[11:]} in every reference "
                    f"{'day' if period == 86400 else 'period'}) is empty: the reference period must cover every "
                    "window of the period with at least min_rows rows, or use period='day' / reference='previous'")
            pool = ("ref", np.concatenate([ref_groups[v] for v in matched]))
        elif mode == "previous":
            pool = prev
        else:
            pool = ("ref", all_ref)
        res = stats.compute(pool, ("cur", idx), salt=10_000_000 + w, static=(mode == "static"))
        for s, v in res.items():
            if mode == "static":  # Evidently's defaults on the raw statistic
                thr = v.get("threshold", STATIC_THRESHOLD.get(KIND[s]))
                score, score_thr = v["statistic"], thr
                floor_ok = True
            elif s in thresholds:
                thr = score_thr = thresholds[s]
                score = v["score"]
                # the effect must also be practically large: at least Evidently's default on the raw statistic,
                # so a constant reference (no refusals yet) does not alarm on a single refusal
                floor_ok = v["statistic"] >= STATIC_THRESHOLD.get(KIND[s], 0.0)
            else:
                continue
            drifted = bool(score > score_thr and floor_ok)
            rec["statistics"][s] = {"statistic": v["statistic"], "score": score, "threshold": thr, "drifted": drifted}
            if "test" in v:
                rec["statistics"][s]["test"] = v["test"]
            per_signal_thr[s].append(thr)
            if drifted:
                rec["drifted"].append(s)
        rec["reference_n"] = len(pool[1])
        windows.append(rec)
        prev = ("cur", idx)

    rules = [Rule(metric=f"drift.{s}", op=">", threshold=1.0, severity=cfg.severity, for_windows=need,
                  clear_windows=cfg.clear_after, name=f"drift.{s}") for s in signals]
    engine = AlertEngine(rules, list(sinks))
    per_window = drift_metrics({"windows": windows})  # drift.<signal> > 1 exactly when the window drifted
    for i, w in enumerate(windows):
        engine.observe(w["start"], per_window.get(w["start"], {}), i)
    alerts = alert_intervals(engine.events)
    for a in alerts:
        a["signal"] = a["metric"].removeprefix("drift.")
        a["opened_iso"] = iso(a["opened_at"])

    summary = {}
    for s in signals:
        vals = [w["statistics"][s] for w in windows if s in w["statistics"]]
        summary[s] = {
            "kind": KIND[s],
            "test": vals[-1]["test"] if vals and "test" in vals[-1] else DEFAULT_TEST[KIND[s]]
            if KIND[s] != "embedding" else ("mmd" if cfg.embedding_test == "mmd" else "classifier_auc"),
            # calibrated modes: the threshold on the size-adjusted score (plus the floor on the raw statistic);
            # static mode: Evidently's threshold on the raw statistic (the median where it varies per window)
            "threshold": thresholds.get(s, float(np.median(per_signal_thr[s])) if per_signal_thr[s] else None),
            "floor": STATIC_THRESHOLD.get(KIND[s]) if mode != "static" else None,
            "statistic": vals[-1]["statistic"] if vals else None,
            "max_statistic": max((v["statistic"] for v in vals), default=None),
            "max_score": max((v["score"] for v in vals), default=None),
            "windows": len(vals), "drifted_windows": sum(v["drifted"] for v in vals),
            "drifted": any(a["signal"] == s for a in alerts),
            "calibration_windows": len(calib.get(s, [])),
        }
    cfg_out = asdict(cfg)
    return json_ready({"mode": mode, "mode_note": note, "period_s": period, "window_s": cfg.window_s,
                       "reference_rows": len(ref_rows),
            "current_rows": len(cur_rows), "signals": summary, "drifted": any(v["drifted"] for v in summary.values()),
            "alerts": alerts, "events": engine.events, "windows": windows, "config": cfg_out})


def json_ready(obj: Any) -> Any:
    """The report with numpy scalars as Python numbers and non-finite floats as None: strict JSON."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def drift_metrics(report: Mapping[str, Any]) -> dict[float, dict[str, float]]:
    """Per window start: ``drift.<signal>`` = score / threshold (> 1: drifted) and ``drift.<signal>.statistic``
    (the raw statistic), for alert rules on drift tests (:mod:`lmstack.monitor.alerts`)."""
    out: dict[float, dict[str, float]] = {}
    for w in report["windows"]:
        m = out.setdefault(w["start"], {})
        for s, v in w["statistics"].items():
            thr = v["threshold"]
            if v["score"] is None or thr is None:
                continue
            ratio = min(v["score"] / thr, 1e9) if thr > 0 else (1e9 if v["score"] > thr else 0.0)
            m[f"drift.{s}"] = ratio if v["drifted"] else min(ratio, 1.0)  # > 1 exactly when drifted (floor too)
            m[f"drift.{s}.statistic"] = v["statistic"]
    return out
