"""Alert rules over per-window metrics (or drift statistics), with hysteresis, deduplication and sinks.

A :class:`Rule` is ``metric op threshold`` held for ``for_windows`` consecutive windows; it opens one alert, which
stays open (no repeats) while the condition lasts and resolves, with one more event, after ``clear_windows``
consecutive windows where it does not hold. A window where the metric is missing (no rows, too few thumbs) leaves
the streaks as they are. Events go to every sink: :class:`LogSink` (the ``lmstack.monitor`` Python logger),
:class:`JsonlSink` (one JSON line per event, appended with a single ``write`` on an ``O_APPEND`` descriptor, so
concurrent writers never interleave a line) and :class:`WebhookSink` (POST of the event as JSON; a failed delivery
is logged and counted, never raised: a monitor keeps monitoring when the receiver is down).

Rules file (YAML or JSON): a list, or ``{"rules": [...]}``, of
``{"metric": "refusal_rate", "op": ">", "threshold": 0.1, "severity": "critical", "for_windows": 2}``.
Metrics of :func:`window_metrics`: ``count``, ``input_len_mean``, ``output_len_mean``, ``refusal_rate``,
``safety_rate``, ``latency_p50``, ``latency_p95``, ``feedback_rate``, ``thumbs_up_rate``; a drift report adds
``drift.<signal>`` (the window's statistic) per signal.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.errors import ConfigError, DataError

log = logging.getLogger("lmstack.monitor")

OPS: dict[str, Callable[[float, float], bool]] = {">": operator.gt, ">=": operator.ge, "<": operator.lt,
                                                   "<=": operator.le, "==": operator.eq, "!=": operator.ne}
SEVERITIES = ("info", "warning", "critical")
RULE_KEYS = {"metric", "op", "threshold", "severity", "for_windows", "clear_windows", "name"}


@dataclass(frozen=True)
class Rule:
    metric: str
    op: str = ">"
    threshold: float = 0.0
    severity: str = "warning"
    for_windows: int = 1
    clear_windows: int = 1
    name: str = ""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"alert rule {self.label}: op {self.op!r} is not one of {' '.join(OPS)}")
        if self.severity not in SEVERITIES:
            raise ConfigError(f"alert rule {self.label}: severity {self.severity!r}: use {', '.join(SEVERITIES)}")
        if self.for_windows < 1 or self.clear_windows < 1:
            raise ConfigError(f"alert rule {self.label}: for_windows and clear_windows must be >= 1")

    @property
    def label(self) -> str:
        return self.name or f"{self.metric} {self.op} {self.threshold:g}"

    def holds(self, value: float) -> bool:
        return OPS[self.op](value, self.threshold)


def rule_from_dict(d: Any, where: str = "rule") -> Rule:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: a rule must be a mapping with metric, op, threshold")
    unknown = set(d) - RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(RULE_KEYS))}")
    if not isinstance(d.get("metric"), str) or not d["metric"]:
        raise ConfigError(f"{where}: field 'metric' is required (a metric name such as refusal_rate)")
    thr = d.get("threshold", 0.0)
    if isinstance(thr, bool) or not isinstance(thr, (int, float)):
        raise ConfigError(f"{where}: field 'threshold' must be a number, got {thr!r}")
    for key in ("for_windows", "clear_windows"):
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], int)):
            raise ConfigError(f"{where}: field {key!r} must be an integer >= 1, got {d[key]!r}")
    return Rule(metric=d["metric"], op=str(d.get("op", ">")), threshold=float(thr),
                severity=str(d.get("severity", "warning")), for_windows=int(d.get("for_windows", 1)),
                clear_windows=int(d.get("clear_windows", 1)), name=str(d.get("name", "")))


def load_rules(path: str | os.PathLike) -> list[Rule]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataError(f"rules file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"rules file {path}: not valid YAML/JSON ({e})") from None
    if isinstance(data, Mapping):
        data = data.get("rules")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"rules file {path}: expected a non-empty list of rules (or a mapping with 'rules')")
    return [rule_from_dict(d, f"{path}: rule {i}") for i, d in enumerate(data)]


# ------------------------------------------------------------------------------------------ sinks

class LogSink:
    def __init__(self, logger: logging.Logger | None = None):
        self.logger = logger or log

    def send(self, event: dict[str, Any]) -> None:
        level = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}[event["severity"]]
        verb = "OPEN" if event["event"] == "open" else "RESOLVED"
        self.logger.log(level, "alert %s %s: %s = %s (threshold %s %s) at %s", verb, event["rule"], event["metric"],
                        event["value"], event["op"], event["threshold"], event["time"])


class JsonlSink:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def send(self, event: dict[str, Any]) -> None:
        line = (json.dumps(event, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)  # one write on O_APPEND: the line lands whole, after every other writer's
        finally:
            os.close(fd)


class WebhookSink:
    def __init__(self, url: str, timeout: float = 5.0):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"webhook url {url!r} must start with http:// or https://")
        self.url, self.timeout = url, timeout
        self.failures = 0

    def send(self, event: dict[str, Any]) -> None:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url, data=json.dumps(event).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as e:
            self.failures += 1
            log.warning("alert webhook %s failed: %s", self.url, e)


# ------------------------------------------------------------------------------------------ engine

@dataclass
class _State:
    open: bool = False
    hold: int = 0
    clear: int = 0
    opened: dict[str, Any] | None = None


@dataclass
class AlertEngine:
    """Rule states across windows; :meth:`observe` returns (and sends) the open/resolve events of one window."""
    rules: Sequence[Rule]
    sinks: Sequence[Any] = ()
    states: dict[int, _State] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def observe(self, time: float, metrics: Mapping[str, Any], window: int | None = None) -> list[dict[str, Any]]:
        out = []
        for i, rule in enumerate(self.rules):
            st = self.states.setdefault(i, _State())
            v = metrics.get(rule.metric)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if rule.holds(float(v)):
                st.hold, st.clear = st.hold + 1, 0
                if not st.open and st.hold >= rule.for_windows:
                    st.open = True
                    st.opened = self._event("open", rule, time, float(v), window)
                    out.append(st.opened)
            else:
                st.hold, st.clear = 0, st.clear + 1
                if st.open and st.clear >= rule.clear_windows:
                    st.open = False
                    ev = self._event("resolve", rule, time, float(v), window)
                    ev["opened_at"] = st.opened["time"] if st.opened else None
                    out.append(ev)
        for ev in out:
            for sink in self.sinks:
                sink.send(ev)
        self.events += out
        return out

    @staticmethod
    def _event(kind: str, rule: Rule, time: float, value: float, window: int | None) -> dict[str, Any]:
        return {"event": kind, "rule": rule.label, "metric": rule.metric, "op": rule.op, "threshold": rule.threshold,
                "severity": rule.severity, "value": value, "time": time, "window": window}

    def open_alerts(self) -> list[dict[str, Any]]:
        return [s.opened for s in self.states.values() if s.open and s.opened]


def evaluate_rules(rules: Sequence[Rule], series: Iterable[tuple[float, Mapping[str, Any]]],
                   sinks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    engine = AlertEngine(list(rules), list(sinks))
    for i, (t, metrics) in enumerate(series):
        engine.observe(t, metrics, i)
    return engine.events


def alert_intervals(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pair each open event with its resolve: ``{rule, metric, severity, opened_at, resolved_at|None, ...}``."""
    out, pending = [], {}
    for ev in events:
        if ev["event"] == "open":
            item = {k: ev[k] for k in ("rule", "metric", "severity", "threshold", "value")}
            item.update(opened_at=ev["time"], opened_window=ev["window"], resolved_at=None)
            pending[ev["rule"]] = item
            out.append(item)
        elif ev["rule"] in pending:
            pending.pop(ev["rule"])["resolved_at"] = ev["time"]
    return out


# ------------------------------------------------------------------------------------------ metrics

def window_index(times: np.ndarray, window_s: float) -> np.ndarray:
    return np.floor(np.asarray(times, float) / window_s).astype(np.int64)


def window_metrics(rows: Sequence[dict[str, Any]], window_s: float = 3600.0) -> list[tuple[float, dict[str, Any]]]:
    """(window start, metrics) for every window from the first row's to the last's (empty ones have count 0)."""
    from lmstack.monitor.rows import is_refusal, safety_flags, thumb, words

    if not rows:
        return []
    idx = window_index(np.array([r["time"] for r in rows]), window_s)
    groups: dict[int, list[dict[str, Any]]] = {}
    for w, r in zip(idx.tolist(), rows):
        groups.setdefault(w, []).append(r)
    out = []
    for w in range(int(idx.min()), int(idx.max()) + 1):
        rs = groups.get(w, [])
        m: dict[str, Any] = {"count": len(rs)}
        if rs:
            lat = np.array([float(r.get("latency_s") or 0.0) for r in rs])
            thumbs = [t for t in (thumb(r) for r in rs) if t is not None]
            m.update(input_len_mean=float(np.mean([len(words(r["input"])) for r in rs])),
                     output_len_mean=float(np.mean([len(words(r["output"])) for r in rs])),
                     refusal_rate=float(np.mean([is_refusal(r["output"]) for r in rs])),
                     safety_rate=float(np.mean([bool(safety_flags(r["output"])) for r in rs])),
                     latency_p50=float(np.percentile(lat, 50)), latency_p95=float(np.percentile(lat, 95)),
                     feedback_rate=len(thumbs) / len(rs),
                     thumbs_up_rate=(sum(t > 0 for t in thumbs) / len(thumbs)) if thumbs else None)
        out.append((w * window_s, m))
    return out

