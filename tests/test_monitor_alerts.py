"""lmstack.monitor.alerts: rules, hysteresis and dedup, the log / JSONL / webhook sinks."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from lmstack.errors import LmstackError
from lmstack.monitor.alerts import (
    AlertEngine,
    JsonlSink,
    LogSink,
    Rule,
    WebhookSink,
    alert_intervals,
    evaluate_rules,
    load_rules,
    window_metrics,
)
from lmstack.monitor.simulate import START


def _series(values, metric="refusal_rate"):
    return [(START + i * 3600, {metric: v}) for i, v in enumerate(values)]


def test_open_once_resolve_once_with_hysteresis():
    rule = Rule("refusal_rate", ">", 0.1, "critical", for_windows=2, clear_windows=2)
    ev = evaluate_rules([rule], _series([0.0, 0.2, 0.3, 0.4, 0.05, 0.3, 0.0, 0.0, 0.5]))
    assert [(e["event"], e["window"]) for e in ev] == [("open", 2), ("resolve", 7)]
    assert ev[0]["severity"] == "critical" and ev[0]["value"] == 0.3
    spans = alert_intervals(ev)
    assert spans == [{"rule": "refusal_rate > 0.1", "metric": "refusal_rate", "severity": "critical",
                      "threshold": 0.1, "value": 0.3, "opened_at": START + 2 * 3600, "opened_window": 2,
                      "resolved_at": START + 7 * 3600}]


def test_missing_metric_keeps_streaks():
    rule = Rule("thumbs_up_rate", "<", 0.5, for_windows=2)
    series = [(0, {"thumbs_up_rate": 0.2}), (1, {"thumbs_up_rate": None}), (2, {"thumbs_up_rate": 0.3})]
    ev = evaluate_rules([rule], series)
    assert [(e["event"], e["window"]) for e in ev] == [("open", 2)]


def test_rules_file_and_errors(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text("rules:\n  - {metric: refusal_rate, op: '>', threshold: 0.1, severity: critical, for_windows: 2}\n"
                 "  - {metric: latency_p95, op: '>=', threshold: 2}\n")
    rules = load_rules(p)
    assert rules[0] == Rule("refusal_rate", ">", 0.1, "critical", 2) and rules[1].op == ">="
    p.write_text("- {metric: x, op: '=>', threshold: 1}\n")
    with pytest.raises(LmstackError, match=r"op '=>' is not one of"):
        load_rules(p)
    p.write_text("- {metric: x, threshold: high}\n")
    with pytest.raises(LmstackError, match=r"rule 0: field 'threshold' must be a number"):
        load_rules(p)
    p.write_text("- {metric: x, treshold: 1}\n")
    with pytest.raises(LmstackError, match="unknown field.*treshold"):
        load_rules(p)
    with pytest.raises(LmstackError, match="severity 'panic'"):
        Rule("x", severity="panic")


def test_sinks_log_jsonl_and_webhook(tmp_path, caplog):
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers["Content-Type"], json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        jsonl = tmp_path / "alerts" / "events.jsonl"
        sinks = [LogSink(), JsonlSink(jsonl), WebhookSink(url, timeout=5)]
        rule = Rule("refusal_rate", ">", 0.1, "warning", name="refusals")
        with caplog.at_level(logging.WARNING, logger="lmstack.monitor"):
            ev = evaluate_rules([rule], _series([0.5, 0.6, 0.0]), sinks)
    finally:
        server.shutdown()
        server.server_close()
    assert [e["event"] for e in ev] == ["open", "resolve"]
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert lines == ev
    assert [r[1] for r in received] == ev and received[0][0] == "application/json"
    assert "alert OPEN refusals" in caplog.text and "alert RESOLVED refusals" in caplog.text


def test_webhook_failure_is_counted_not_raised(caplog):
    sink = WebhookSink("http://127.0.0.1:9/nothing", timeout=0.5)
    eng = AlertEngine([Rule("count", ">", 0)], [sink])
    eng.observe(0, {"count": 5})
    assert sink.failures == 1 and eng.open_alerts()[0]["metric"] == "count"
    with pytest.raises(LmstackError, match="must start with http"):
        WebhookSink("ftp://x")


def test_window_metrics():
    rows = [{"time": START + 10, "input": "a b", "output": "I'm sorry, I can't.", "latency_s": 1.0, "thumb": -1},
            {"time": START + 20, "input": "a b c d", "output": "Sure thing", "latency_s": 3.0},
            {"time": START + 7300, "input": "x", "output": "ok", "latency_s": 2.0, "thumb": 1}]
    m = window_metrics(rows, 3600)
    assert [t for t, _ in m] == [START, START + 3600, START + 7200]
    w0 = m[0][1]
    assert w0["count"] == 2 and w0["refusal_rate"] == 0.5 and w0["input_len_mean"] == 3.0
    assert w0["latency_p50"] == 2.0 and w0["feedback_rate"] == 0.5 and w0["thumbs_up_rate"] == 0.0
    assert m[1][1] == {"count": 0} and m[2][1]["thumbs_up_rate"] == 1.0


def test_jsonl_sink_concurrent_appends_keep_lines_whole(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    pad = "x" * 3000  # longer than a pipe buffer's atomic size: a regular file's O_APPEND write still lands whole

    def writer(k):
        for i in range(100):
            sink.send({"writer": k, "i": i, "pad": pad})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 800 and sorted((d["writer"], d["i"]) for d in lines) == [(k, i) for k in range(8)
                                                                                  for i in range(100)]
