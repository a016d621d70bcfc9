"""The speedrun's monitoring stage (drift half): a simulated week through drift detection and alert rules.

:func:`speedrun_monitor_drift` simulates a week of traffic (:mod:`lmstack.monitor.simulate`: a daily cycle in
volume, lengths and topic mix; from day 5 a new topic takes 30% of requests and the model refuses 20% of them),
takes days 0-3 as the reference and days 4-6 as the current period, and runs

- :func:`lmstack.monitor.drift.drift_report` with the seasonal (same hour of day) reference and calibrated
  thresholds -- the alerts should open on the shift (day 5) and none on day 4, whose only change is the cycle;
- the same with the naive previous-window reference, for contrast;
- one alert rule on the raw refusal rate (``refusal_rate > 0.1`` for 2 windows, critical);

and writes ``drift.json``, ``alerts.jsonl`` (every alert event) and ``dashboard.html`` into the run folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

SHIFT_DAY, REFERENCE_DAYS = 5, 4


def replay_through_store(rows: list[dict[str, Any]], store: Any) -> list[dict[str, Any]]:
    """Log simulated rows (and their thumbs, as Feedback) into a log store and read them back as drift rows:
    what monitoring sees is what the logging path kept."""
    from lmstack.monitor.rows import attach_feedback
    from lmstack.monitor.store import FIELDS, Feedback, Interaction, interaction_to_dict

    store.log_many([Interaction(**{k: r[k] for k in FIELDS if k in r}) for r in rows])
    for r in rows:
        if r.get("thumb") is not None:
            store.add_feedback(Feedback(r["id"], "thumb", value=float(r["thumb"]), time=r["time"]))
    back = [interaction_to_dict(r) for r in store.rows()]
    return attach_feedback(back, store.feedback())


def speedrun_monitor_drift(run_dir: str | os.PathLike, seed: int = 0, rows_per_hour: float = 60.0,
                           store: Any = None) -> tuple[dict[str, Any], str]:
    from lmstack.monitor.alerts import JsonlSink, Rule, evaluate_rules, window_metrics
    from lmstack.monitor.dashboard import render_dashboard
    from lmstack.monitor.drift import drift_report, iso
    from lmstack.monitor.simulate import START, SimConfig, simulate_traffic, split_at_day
    from lmstack.runs import atomic_write_json

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sim = SimConfig(days=7, rows_per_hour=rows_per_hour, shift_day=SHIFT_DAY, topic_shift=0.3, refusal_rate=0.2,
                    seed=seed)
    rows = simulate_traffic(sim)
    if store is not None:     # through the interaction log, as a live server's rows would arrive
        rows = replay_through_store(rows, store)
    ref, cur = split_at_day(rows, REFERENCE_DAYS)
    shift = START + SHIFT_DAY * 86400
    alerts_path = run_dir / "alerts.jsonl"
    alerts_path.unlink(missing_ok=True)
    sink = JsonlSink(alerts_path)
    seasonal = drift_report(ref, cur, {"seed": seed}, sinks=[sink])
    naive = drift_report(ref, cur, {"seed": seed, "reference": "previous"})
    rule_events = evaluate_rules([Rule("refusal_rate", ">", 0.1, "critical", for_windows=2, name="refusal rate")],
                                 window_metrics(cur, 3600.0), [sink])
    atomic_write_json(run_dir / "drift.json", seasonal)
    render_dashboard(cur, seasonal, run_dir / "dashboard.html", title="lmstack monitor: simulated week")

    def summary(rep: dict[str, Any]) -> dict[str, Any]:
        before = [a for a in rep["alerts"] if a["opened_at"] < shift]
        after = [a for a in rep["alerts"] if a["opened_at"] >= shift]
        delay = {}
        for a in after:
            delay.setdefault(a["signal"], int((a["opened_at"] - shift) // 3600))
        return {"alerts_before_shift": len(before), "alerts_after_shift": len(after),
                "false_alarm_signals": sorted({a["signal"] for a in before}),
                "detected": sorted(delay), "delay_windows": delay}

    results = {"rows": len(rows), "reference_rows": len(ref), "current_rows": len(cur), "shift_at": iso(shift),
               "seasonal": summary(seasonal), "previous_window": summary(naive),
               "refusal_rule_opened": next((iso(e["time"]) for e in rule_events if e["event"] == "open"), None),
               "alert_events": sum(1 for _ in alerts_path.open()) if alerts_path.exists() else 0,
               "dashboard": str(run_dir / "dashboard.html"), "seconds": round(time.perf_counter() - t0, 2)}
    s, n = results["seasonal"], results["previous_window"]
    lines = ["## Monitoring: drift on a simulated week", "",
             (f"{len(rows)} simulated interactions (daily cycle; from {iso(shift)} a new topic takes 30% of requests "
              f"and the model refuses 20%). Reference: days 0-{REFERENCE_DAYS - 1}; current: days "
              f"{REFERENCE_DAYS}-6, in 1-hour windows; an alert needs 3 drifted windows in a row."), "",
             "| reference | alerts before the shift | alerts after | signals detected (delay in windows) |",
             "|---|---|---|---|"]
    for name, r in (("seasonal (same hour of day)", s), ("previous window", n)):
        det = ", ".join(f"{k} ({v})" for k, v in sorted(r["delay_windows"].items(), key=lambda kv: kv[1])) or "none"
        lines.append(f"| {name} | {r['alerts_before_shift']} | {r['alerts_after_shift']} | {det} |")
    lines += ["", (f"Rule `refusal_rate > 0.1` for 2 windows (critical) opened at {results['refusal_rule_opened']}. "
                   f"{results['alert_events']} alert events in `alerts.jsonl`; dashboard: `dashboard.html`."), ""]
    return results, "\n".join(lines)
