"""A static HTML monitoring report: traffic, latency, drift over time with alert markers, feedback, A/B results.

One self-contained file (PNG plots inlined as base64 data URIs, no scripts, no network), rendered from the rows
and a :func:`lmstack.monitor.drift.drift_report` result only, and written atomically (:mod:`lmstack.runs`).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmstack.monitor.alerts import window_metrics
from lmstack.runs import atomic_write_text

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.bad{color:#b00;font-weight:bold}
img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:4px}"""


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _dates(ts: Sequence[float]) -> list[datetime]:
    return [datetime.fromtimestamp(t, UTC) for t in ts]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, str) and c.startswith('<') else _fmt(c)}</td>"
                                    for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_dashboard(rows: Sequence[dict[str, Any]], drift: dict[str, Any] | None, path: str | os.PathLike,
                     ab: dict[str, Any] | None = None, title: str = "lmstack monitor",
                     window_s: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmstack.monitor.rows import normalize_rows

    rows = normalize_rows(rows)
    window_s = window_s or (drift or {}).get("window_s", 3600.0)
    series = window_metrics(rows, window_s)
    t = _dates([s for s, _ in series])
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{len(rows)} interactions, {len(series)} windows of {window_s / 3600:g} h"
             + (f", from {t[0]:%Y-%m-%d %H:%M} to {t[-1]:%Y-%m-%d %H:%M} UTC" if t else "") + ".</p>"]
    alerts = (drift or {}).get("alerts", [])

    def mark_alerts(ax: Any) -> None:
        for a in alerts:
            ax.axvline(datetime.fromtimestamp(a["opened_at"], UTC), color="red", lw=1, ls="--", alpha=0.7)

    if series:
        fig, ax = plt.subplots(figsize=(10, 2.6))
        ax.bar(t, [m["count"] for _, m in series], width=window_s / 86400 * 0.9, color="#4a7")
        ax.set_ylabel("requests / window")
        mark_alerts(ax)
        parts += ["<h2>Traffic</h2>", f'<img src="{_png(fig)}" alt="traffic">']
        fig, ax = plt.subplots(figsize=(10, 2.6))
        for key, label in (("latency_p50", "p50"), ("latency_p95", "p95")):
            ax.plot(t, [m.get(key) for _, m in series], label=label)
        ax.set_ylabel("latency (s)")
        ax.legend(loc="upper left")
        parts += ["<h2>Latency</h2>", f'<img src="{_png(fig)}" alt="latency">']

    if drift:
        wins = drift["windows"]
        wt = _dates([w["start"] for w in wins])
        signals = list(drift["signals"])
        fig, ax = plt.subplots(figsize=(10, 3.6))
        for s in signals:
            ys = [(w["statistics"][s]["score"] / w["statistics"][s]["threshold"]
                   if s in w["statistics"] and w["statistics"][s]["threshold"]
                   else (100.0 if s in w["statistics"] and w["statistics"][s]["score"] > 0 else
                         (0.01 if s in w["statistics"] else None))) for w in wins]
            # clipped to [0.01, 100] on a log axis: a threshold of 0 (a constant reference) shows as 100
            ax.plot(wt, [min(max(y, 0.01), 100.0) if y is not None else float("nan") for y in ys], label=s, lw=1)
        ax.axhline(1.0, color="black", lw=1)
        mark_alerts(ax)
        ax.set_yscale("log")
        ax.set_ylabel("statistic / threshold")
        ax.legend(loc="upper left", fontsize=7, ncol=4)
        parts += [f"<h2>Drift ({html.escape(drift['mode'])} reference, period {drift['period_s'] / 3600:g} h)</h2>",
                  ("<p>Each signal's window statistic over its calibrated threshold (above 1: drifted, log scale, "
                   "clipped to [0.01, 100]); dashed red lines: alerts opened.</p>"),
                  f'<img src="{_png(fig)}" alt="drift">']
        parts.append(_table(["signal", "test", "threshold", "last", "max", "drifted windows", "alert"],
                            [[s, v["test"], v["threshold"], v["statistic"], v["max_statistic"],
                              f"{v['drifted_windows']}/{v['windows']}",
                              '<span class="bad">yes</span>' if v["drifted"] else "no"]
                             for s, v in drift["signals"].items()]))
        parts.append("<h3>Alerts</h3>")
        parts.append(_table(["signal", "severity", "opened (UTC)", "resolved (UTC)"],
                            [[a["signal"], a["severity"], a["opened_iso"],
                              datetime.fromtimestamp(a["resolved_at"], UTC).strftime("%Y-%m-%dT%H:%MZ")
                              if a["resolved_at"] else "open"] for a in alerts]) if alerts else "<p>No alerts.</p>")

    if series and any(m.get("feedback_rate") for _, m in series):
        fig, ax = plt.subplots(figsize=(10, 2.6))
        ax.plot(t, [m.get("thumbs_up_rate") for _, m in series], label="thumbs-up rate")
        ax.plot(t, [m.get("feedback_rate") for _, m in series], label="feedback rate")
        ax.plot(t, [m.get("refusal_rate") for _, m in series], label="refusal rate")
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left")
        mark_alerts(ax)
        parts += ["<h2>Feedback</h2>", f'<img src="{_png(fig)}" alt="feedback">']

    if ab:
        parts.append("<h2>A/B test</h2>")
        srm = ab.get("srm", {})
        parts.append(f"<p><b>{html.escape(ab.get('recommendation', ''))}</b>: "
                     f"{html.escape(ab.get('reasoning', ''))}</p>")
        parts.append(f"<p>SRM check: p = {_fmt(srm.get('p_value'))} ({'flagged' if srm.get('flagged') else 'ok'}), "
                     f"counts {html.escape(str(srm.get('counts')))}.</p>")
        if ab.get("arms"):
            parts.append(_table(["arm", "n", "value", "95% CI"],
                                [[arm, v["n"], v.get("rate", v.get("mean")),
                                  f"[{_fmt(v['ci'][0])}, {_fmt(v['ci'][1])}]"] for arm, v in ab["arms"].items()]))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    return atomic_write_text(path, page)
