"""lmstack monitor drift|ab|alerts|report: the public drift command, exit code 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmstack.cli import main
from lmstack.monitor.simulate import simulate_traffic, split_at_day


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mon")
    rows = simulate_traffic(days=5, rows_per_hour=30, shift_day=4, refusal_rate=0.3, topic_shift=0.5, seed=1)
    ref, cur = split_at_day(rows, 3)
    for name, rs in (("ref", ref), ("cur", cur)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return d


def test_drift_json(files, capsys):
    code = main(["monitor", "drift", "--reference", str(files / "ref.jsonl"), "--current", str(files / "cur.jsonl"),
                 "--json", "--signals", "refusal,input_len,topic_novelty"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(out["signals"]) == {"refusal", "input_len", "topic_novelty"}
    for v in out["signals"].values():
        assert {"statistic", "threshold", "drifted"} <= set(v)
    assert out["signals"]["refusal"]["drifted"] is True and out["drifted"] is True
    assert any(a["signal"] == "refusal" for a in out["alerts"])


def test_drift_table(files, capsys):
    assert main(["monitor", "drift", "--reference", str(files / "ref.jsonl"), "--current", str(files / "cur.jsonl"),
                 "--signals", "refusal"]) == 0
    out = capsys.readouterr().out
    assert "refusal" in out and "ALERT" in out and "alert: refusal opened" in out


def test_drift_bad_inputs_exit_2(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"time": 1, "input": "a", "output": "b"}\n{"time": 2, "output": "b"}\n')
    cases = [
        (["--reference", str(bad), "--current", str(files / "cur.jsonl")], "bad.jsonl:2: missing field 'input'"),
        (["--reference", str(tmp_path / "nope.jsonl"), "--current", str(files / "cur.jsonl")], "does not exist"),
        (["--reference", str(files / "ref.jsonl"), "--current", str(files / "cur.jsonl"), "--signals", "mood"],
         "unknown signal(s) mood"),
        (["--reference", str(files / "ref.jsonl"), "--current", str(files / "cur.jsonl"), "--period", "month"],
         "period 'month'"),
    ]
    for argv, msg in cases:
        assert main(["monitor", "drift", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1


def test_ab_alerts_report(files, tmp_path, capsys):
    from lmstack.monitor.ab import assign

    rows = [{"user": f"u{i}", "arm": assign(f"u{i}", "e", {"A": 0.5, "B": 0.5}), "time": i,
             "converted": int((i * 7919) % 10 < (3 if i % 2 else 2))} for i in range(2000)]
    p = tmp_path / "ab.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["monitor", "ab", str(p), "--metric", "converted", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["arms"]) == {"A", "B"} and not out["srm"]["flagged"] and out["recommendation"]
    assert main(["monitor", "ab", str(p), "--metric", "converted", "--shares", "A=0.9,B=0.1"]) == 0
    assert "FLAGGED" in capsys.readouterr().out
    assert main(["monitor", "ab", str(p), "--metric", "converted", "--shares", "A"]) == 2
    assert "ARM=SHARE" in capsys.readouterr().err

    rules = tmp_path / "rules.yaml"
    rules.write_text("- {metric: refusal_rate, op: '>', threshold: 0.1, severity: critical, for_windows: 2}\n")
    events = tmp_path / "events.jsonl"
    assert main(["monitor", "alerts", str(files / "cur.jsonl"), "--rules", str(rules), "--jsonl", str(events),
                 "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev[0]["event"] == "open" and ev[0]["metric"] == "refusal_rate"
    assert [json.loads(x) for x in events.read_text().splitlines()] == ev
    rules.write_text("- {metric: drift.topic_novelty, op: '>', threshold: 1, for_windows: 3, severity: critical}\n")
    assert main(["monitor", "alerts", str(files / "cur.jsonl"), "--rules", str(rules), "--reference",
                 str(files / "ref.jsonl"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev[0]["event"] == "open" and ev[0]["metric"] == "drift.topic_novelty" and ev[0]["value"] > 1
    rules.write_text("- {metric: refusal_rate, op: 'above'}\n")
    assert main(["monitor", "alerts", str(files / "cur.jsonl"), "--rules", str(rules)]) == 2
    assert "op 'above'" in capsys.readouterr().err

    ab_json = tmp_path / "ab.json"
    assert main(["monitor", "ab", str(p), "--metric", "converted", "--json"]) == 0
    ab_json.write_text(capsys.readouterr().out)
    html = tmp_path / "dash.html"
    assert main(["monitor", "report", str(files / "cur.jsonl"), "--reference", str(files / "ref.jsonl"),
                 "--ab", str(ab_json), "--out", str(html)]) == 0
    page = html.read_text()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 4
    assert "Alerts" in page and "refusal" in page and "A/B test" in page and "SRM check" in page


def test_help_does_not_import_numpy():
    code = ("import argparse, sys; from lmstack.monitor import cli; "
            "cli.register(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('numpy', 'matplotlib', 'torch', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ab_from_the_log_store(monkeypatch, capsys):
    """--store goes through the LogStore protocol only (open_store, rows, feedback, close): a stand-in store."""
    import types
    from dataclasses import dataclass

    from lmstack.monitor.ab import assign

    @dataclass
    class Interaction:
        id: str
        time: float
        arm: str
        input: str = "q"
        output: str = "a"

    @dataclass
    class Feedback:
        interaction_id: str
        kind: str
        value: float | None = None

    rows = [Interaction(f"i{i}", float(i), assign(f"u{i}", "e", {"A": 0.5, "B": 0.5})) for i in range(600)]
    fbs = [Feedback(r.id, "thumb", 1 if (i % 3 or r.arm == "B") else -1) for i, r in enumerate(rows)]
    closed = []

    class Store:
        def rows(self):
            return rows

        def feedback(self, interaction_id=None):
            return fbs

        def close(self):
            closed.append(True)

    fake = types.ModuleType("lmstack.monitor.store")
    fake.open_store = lambda url: Store()
    monkeypatch.setitem(sys.modules, "lmstack.monitor.store", fake)
    assert main(["monitor", "ab", "--store", "sqlite:///x.db", "--metric", "thumbs_up", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arms"]["B"]["rate"] == 1.0 and out["arms"]["A"]["rate"] < 0.75 and closed == [True]
    assert main(["monitor", "ab", "--metric", "thumbs_up"]) == 2
    assert "give ROWS.jsonl or --store URL" in capsys.readouterr().err
