"""The monitoring stage's drift half: alerts on the shift, none on the daily cycle, the dashboard written."""

from __future__ import annotations

import json

from lmstack.monitor.speedrun import speedrun_monitor_drift


def test_speedrun_monitor_drift(tmp_path):
    results, md = speedrun_monitor_drift(tmp_path, seed=0, rows_per_hour=40)
    s = results["seasonal"]
    assert s["alerts_before_shift"] == 0 and s["alerts_after_shift"] >= 2
    assert "refusal" in s["detected"] and s["delay_windows"]["refusal"] <= 4
    assert results["refusal_rule_opened"] is not None
    assert len(results["previous_window"]["detected"]) < len(s["detected"])
    events = [json.loads(x) for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert len(events) == results["alert_events"] and {e["event"] for e in events} <= {"open", "resolve"}
    assert json.loads((tmp_path / "drift.json").read_text())["mode"] == "seasonal"
    assert (tmp_path / "dashboard.html").read_text().startswith("<!doctype html>")
    assert "| seasonal (same hour of day) | 0 |" in md
