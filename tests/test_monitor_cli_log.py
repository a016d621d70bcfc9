"""``lmstack monitor export|feedback-export|prune|stats`` through the real ``lmstack`` entry point (exit code 2
and one ``error:`` line on bad input). Where ``lmstack.monitor.cli`` is not registered yet, a stand-in
``monitor`` command carrying only :func:`register_log_commands` is added for the test."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types

import pytest

from lmstack.monitor.cli_log import parse_when, register_log_commands
from lmstack.monitor.store import Feedback, Interaction, open_store

T0 = 1_780_000_000.0   # 2026-05-28 20:26:40 UTC


@pytest.fixture
def lmstack(monkeypatch, capsys):
    from lmstack import cli

    if "lmstack.monitor.cli" not in cli.LAYER_CLIS:
        stand_in = types.ModuleType("_monitor_log_stand_in")

        def register(sub):
            p = sub.add_parser("monitor")
            register_log_commands(p.add_subparsers(dest="monitor_command"))

        stand_in.register = register
        monkeypatch.setitem(sys.modules, stand_in.__name__, stand_in)
        monkeypatch.setattr(cli, "LAYER_CLIS", [*cli.LAYER_CLIS, stand_in.__name__])

    def run(*argv):
        capsys.readouterr()
        try:
            code = cli.main(["monitor", *map(str, argv)])
        except SystemExit as e:   # argparse's own usage errors
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "log.db"
    with open_store(path) as s:
        now = time.time()
        ids = s.log_many([Interaction(id="", time=T0, model="a", input="q", output="yes", latency_s=0.5),
                          Interaction(id="", time=T0 + 60, model="a", input="q", output="no", latency_s=1.5),
                          Interaction(id="", time=T0 + 86400, model="b", input="r", output="maybe"),
                          Interaction(id="", time=now, model="b", input="fresh", output="new")])
        s.add_feedback(Feedback(ids[0], "thumb", value=1))
        s.add_feedback(Feedback(ids[1], "thumb", value=-1))
        s.add_feedback(Feedback(ids[0], "pairwise", other_id=ids[1], value=1))
    return path


def test_export_writes_rows_and_filters(lmstack, db, tmp_path):
    code, out, _ = lmstack("export", "--store", db, "--out", tmp_path / "all.jsonl")
    assert code == 0 and out == f"wrote 4 interactions to {tmp_path / 'all.jsonl'}\n"
    code, out, _ = lmstack("export", "--store", f"sqlite://{db}", "--out", tmp_path / "a.jsonl", "--model", "a",
                           "--since", "2026-05-28T20:27:00", "--with-feedback")
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert code == 0 and [r["output"] for r in rows] == ["no"]
    assert [f["kind"] for f in rows[0]["feedback"]] == ["thumb", "pairwise"]


def test_feedback_export_writes_dpo_and_kto(lmstack, db, tmp_path):
    code, out, _ = lmstack("feedback-export", "--store", db, "--dpo", tmp_path / "p.jsonl", "--kto", tmp_path / "k.jsonl")
    assert code == 0
    assert out.splitlines() == [f"wrote 1 preference pairs to {tmp_path / 'p.jsonl'}",
                                f"wrote 2 KTO rows to {tmp_path / 'k.jsonl'}"]
    pair = json.loads((tmp_path / "p.jsonl").read_text())
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ("q", "yes", "no")


def test_stats_and_prune(lmstack, db, monkeypatch):
    monkeypatch.setenv("LMSTACK_LOG_STORE", str(db))    # the default --store
    code, out, _ = lmstack("stats", "--json")
    stats = json.loads(out)
    assert code == 0 and [(r["model"], r["day"], r["interactions"]) for r in stats][:2] == [
        ("a", "2026-05-28", 2), ("b", "2026-05-29", 1)]
    assert (stats[0]["thumbs_up"], stats[0]["thumbs_down"], stats[0]["mean_latency_s"]) == (1, 1, 1.0)
    code, out, _ = lmstack("stats")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["model", "day", "interactions", "feedback", "up", "down", "mean",
                                              "latency", "s"]
    assert lines[1].split() == ["a", "2026-05-28", "2", "3", "1", "1", "1.000"]
    code, out, _ = lmstack("prune", "--older-than", "1")
    assert code == 0 and out == "deleted 3 interactions older than 1 days\n"
    with open_store(db) as s:
        assert [r.input for r in s.rows()] == ["fresh"] and s.feedback() == []


@pytest.mark.parametrize("argv, message", [
    (["export", "--store", "{tmp}/missing.db", "--out", "{tmp}/x.jsonl"], "missing.db: no such log store"),
    (["export", "--out", "{tmp}/x.jsonl"], "--store: give the log store's URL or path (or set $LMSTACK_LOG_STORE)"),
    (["export", "--store", "{db}", "--out", "{tmp}/x.jsonl", "--since", "5", "--until", "4"],
     "--until (4.0) must come after --since (5.0)"),
    (["export", "--store", "mysql://u@h/d", "--out", "{tmp}/x.jsonl"], "unknown scheme 'mysql'"),
    (["feedback-export", "--store", "{db}"], "feedback-export: give --dpo FILE, --kto FILE or both"),
    (["stats", "--store", "{tmp}"], "is a folder; give the log store a file path"),
])
def test_bad_input_is_one_line_and_exit_2(lmstack, db, tmp_path, monkeypatch, argv, message):
    monkeypatch.delenv("LMSTACK_LOG_STORE", raising=False)
    code, _, err = lmstack(*[a.format(tmp=tmp_path, db=db) for a in argv])
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("argv, message", [
    (["prune", "--store", "x.db", "--older-than", "-3"], "must be a number of days >= 0"),
    (["prune", "--store", "x.db", "--older-than", "soon"], "expected a number of days"),
    (["export", "--store", "x.db", "--out", "o.jsonl", "--since", "last tuesday"], "expected unix seconds or an ISO"),
    (["export", "--store", "x.db"], "the following arguments are required: --out"),
])
def test_bad_arguments_exit_2(lmstack, argv, message):
    code, _, err = lmstack(*argv)
    assert code == 2 and message in err


def test_unreachable_postgres_from_the_cli(lmstack, tmp_path):
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = lmstack("stats", "--store", f"postgresql://bob:hunter2@127.0.0.1:{port}/logs")
    assert code == 2 and err.startswith(f"error: postgresql://bob:***@127.0.0.1:{port}/logs: cannot connect")
    assert "hunter2" not in err and err.count("\n") == 1


def test_parse_when():
    assert parse_when("1780000000.5") == 1780000000.5
    assert parse_when("2026-05-28T20:26:40") == T0 == parse_when("2026-05-28T22:26:40+02:00")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_when("nan")


def test_registering_imports_nothing_heavy():
    code = ("import sys, argparse; from lmstack.monitor.cli_log import register_log_commands; "
            "p = argparse.ArgumentParser(); register_log_commands(p.add_subparsers()); "
            "heavy = [m for m in ('torch', 'numpy', 'fastapi', 'psycopg', 'lmstack.monitor.store') if m in sys.modules]; "
            "print(heavy)")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "[]"
