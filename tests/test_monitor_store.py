"""The interaction log: one suite run against SQLite and PostgreSQL (``store_url`` is parametrised over both;
the PostgreSQL server is tests/monitor_pg.py's). Round trips of every field, atomic batches, feedback and its
errors, retention, deterministic review samples, export, schema migrations, URL forms and errors, and
concurrent writers (threads and processes) that lose no row, and a writer killed mid-write."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from datetime import timedelta

import pytest

from lmstack.errors import LmstackError
from lmstack.monitor.store import (
    SCHEMA_VERSION,
    Feedback,
    FieldError,
    Interaction,
    PostgresStore,
    SQLiteStore,
    UnknownInteraction,
    export_jsonl,
    interaction_from_dict,
    interaction_to_dict,
    open_store,
    redact_url,
    store_for,
)

pytest_plugins = ("monitor_pg",)   # the store_url fixture: SQLite and PostgreSQL

T0 = 1_780_000_000.0   # a fixed clock: 2026-05-28 20:26:40 UTC


def _row(i: int = 0, **kw) -> Interaction:
    fields = {"id": "", "time": T0 + i, "model": "m", "input": f"question {i}", "output": f"answer {i}"} | kw
    return Interaction(**fields)


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def test_every_field_round_trips(store):
    row = Interaction(id="abc123", time=T0 + 0.123456, model="stories", model_version="step-400",
                      prompt_name="qa", prompt_version=3, route="default", arm="B", user="u1", session="s1",
                      input="Grüße — 你好?", request={"messages": [{"role": "user", "content": "Grüße"}], "n": 1},
                      output="hello\nworld", finish_reason="stop", prompt_tokens=12, completion_tokens=7,
                      latency_s=0.25, ttft_s=0.0625, params={"temperature": 0.7, "stop": ["\n"]},
                      embedding=[0.5, -1.25, 3.0, 1e-3], meta={"judge": {"score": 4}, "flags": []})
    assert store.log(row) == "abc123"
    got = store.get("abc123")
    # the embedding is stored as float32: 1e-3 comes back as its float32 neighbour; the rest are exact
    assert got.embedding[:3] == [0.5, -1.25, 3.0] and got.embedding[3] == pytest.approx(1e-3, rel=1e-7)
    assert interaction_to_dict(got) | {"embedding": None} == interaction_to_dict(row) | {"embedding": None}
    assert store.count() == 1


def test_nul_characters(store):
    store.log(_row(0, id="nul", input="a\x00b", meta={"k\x00": ["x\x00"]}))
    got = store.get("nul")
    if isinstance(store, PostgresStore):   # PostgreSQL text cannot hold NUL: U+FFFD instead
        assert (got.input, got.meta) == ("a\ufffdb", {"k\ufffd": ["x\ufffd"]})
    else:
        assert (got.input, got.meta) == ("a\x00b", {"k\x00": ["x\x00"]})
    store.log(_row(1, id="lit", input="\\u0000 is how JSON writes NUL"))   # the six characters stay as they are
    assert store.get("lit").input == "\\u0000 is how JSON writes NUL"


def test_empty_id_gets_a_new_one_and_defaults_round_trip(store):
    a, b = store.log(_row(0)), store.log(_row(1))
    assert a != b and len(a) == 32 and int(a, 16) >= 0
    got = store.get(a)
    assert (got.request, got.params, got.meta, got.embedding, got.arm, got.ttft_s) == ({}, {}, {}, None, None, None)


def test_log_many_is_one_transaction(store):
    store.log(_row(0, id="dup"))
    with pytest.raises(LmstackError, match="already logged; leave 'id' empty"):
        store.log_many([_row(1, id="fresh1"), _row(2, id="dup"), _row(3, id="fresh2")])
    assert store.count() == 1
    with pytest.raises(UnknownInteraction):
        store.get("fresh1")
    assert len(store.log_many([_row(i) for i in range(5)])) == 5 and store.count() == 6


def test_bad_rows_name_the_field(store):
    with pytest.raises(FieldError, match=r"'model' must be the served model's id") as e:
        store.log(_row(0, model=""))
    assert e.value.field == "model"
    with pytest.raises(FieldError, match=r"'time' must be unix seconds"):
        store.log(_row(0, time=float("nan")))
    with pytest.raises(FieldError, match=r"'prompt_tokens' must be a count"):
        store.log(_row(0, prompt_tokens=-1))
    with pytest.raises(LmstackError, match=r"'meta' must hold JSON values only"):
        store.log(_row(0, meta={"x": float("inf")}))
    with pytest.raises(FieldError, match=r"'embedding' must be a list of numbers"):
        store.log(_row(0, embedding=["a"]))
    assert store.count() == 0


def test_rows_filter_and_keep_time_order(store):
    store.log_many([_row(5, model="a", arm="A"), _row(1, model="b", arm="B"), _row(3, model="a", arm="B")])
    store.log_many([_row(3, id="zz", model="a"), _row(3, id="aa", model="a")])   # a tie in time: id order
    assert [r.time - T0 for r in store.rows()] == [1, 3, 3, 3, 5]
    ties = [r.id for r in store.rows() if r.time == T0 + 3]
    assert ties == sorted(ties) and {"aa", "zz"} <= set(ties)
    assert [r.time - T0 for r in store.rows(since=T0 + 3, until=T0 + 5)] == [3, 3, 3]
    assert {r.model for r in store.rows(model="a")} == {"a"} and len(store.rows(model="a")) == 4
    assert [r.time - T0 for r in store.rows(arm="B")] == [1, 3]
    assert len(store.rows(limit=2)) == 2 and store.rows(limit=0) == []
    # the batched reader pages through ties and batch edges without losing or repeating a row
    assert [r.id for r in store.iter_rows(batch=2)] == [r.id for r in store.rows()]


def test_feedback_kinds_and_errors(store):
    a = store.log(_row(0, input="same prompt"))
    b = store.log(_row(1, input="same prompt", model="m2"))
    c = store.log(_row(2, input="another prompt"))
    store.add_feedback(Feedback(a, "thumb", value=1, time=T0 + 10, user="ann"))
    store.add_feedback(Feedback(a, "comment", text="nice", time=T0 + 11))
    store.add_feedback(Feedback(b, "pairwise", other_id=a, value=-1, time=T0 + 12))
    assert [(f.kind, f.value, f.text) for f in store.feedback(a)] == [("thumb", 1.0, None), ("comment", None, "nice"),
                                                                      ("pairwise", -1.0, None)]
    assert store.feedback(c) == [] and len(store.feedback()) == 3
    assert [f.kind for f in store.feedback(since=T0 + 11)] == ["comment", "pairwise"]
    assert store.feedback(a)[0].user == "ann"
    with pytest.raises(UnknownInteraction, match=r"'interaction_id' 'nope' is not a logged interaction") as e:
        store.add_feedback(Feedback("nope", "thumb", value=1))
    assert e.value.field == "interaction_id"
    with pytest.raises(UnknownInteraction, match=r"'other_id' 'gone' is not a logged interaction"):
        store.add_feedback(Feedback(a, "pairwise", other_id="gone", value=1))
    with pytest.raises(FieldError, match="compares two answers to one prompt"):
        store.add_feedback(Feedback(a, "pairwise", other_id=c, value=1))
    with pytest.raises(FieldError, match=r"'value' of a thumb must be 1 \(up\) or -1 \(down\), got 2"):
        store.add_feedback(Feedback(a, "thumb", value=2))
    with pytest.raises(FieldError, match=r"'kind' must be one of \['thumb', 'comment', 'pairwise'\]"):
        store.add_feedback(Feedback(a, "star", value=1))
    assert len(store.feedback()) == 3
    now = time.time()
    store.add_feedback(Feedback(c, "thumb", value=-1))   # time 0: stamped by the store
    assert store.feedback(c)[0].time >= now


def test_prune_drops_old_rows_and_their_feedback(store):
    ids = store.log_many([_row(i * 86400) for i in range(5)])   # one row a day
    store.add_feedback(Feedback(ids[0], "thumb", value=1))
    store.add_feedback(Feedback(ids[4], "thumb", value=-1))
    assert store.prune(timedelta(days=2), now=T0 + 4 * 86400) == 2   # days 0 and 1 go; day 2 is exactly 2 days old
    assert [r.id for r in store.rows()] == ids[2:]
    assert [f.interaction_id for f in store.feedback()] == [ids[4]]
    assert store.prune(0, now=T0) == 0
    with pytest.raises(LmstackError, match="'older_than' must be a duration >= 0"):
        store.prune(-1)


def test_sample_is_deterministic_and_stratified(store):
    store.log_many([_row(i, model="big") for i in range(40)] + [_row(100 + i, model="small") for i in range(3)])
    s1, s2 = store.sample(10, seed=1), store.sample(10, seed=1)
    assert [r.id for r in s1] == [r.id for r in s2] and len({r.id for r in s1}) == 10
    assert [r.id for r in store.sample(10, seed=2)] != [r.id for r in s1]
    assert [r.time for r in s1] == sorted(r.time for r in s1)
    strat = store.sample(10, seed=1, stratify_by="model")
    assert sum(r.model == "small" for r in strat) == 3 and len(strat) == 10   # the small stratum gives all it has
    even = store.sample(6, seed=0, stratify_by="model")
    assert sum(r.model == "small" for r in even) == 3 and sum(r.model == "big" for r in even) == 3
    assert len(store.sample(100, seed=0)) == 43
    assert {r.model for r in store.sample(5, seed=0, model="small")} == {"small"}
    assert len(store.sample(50, seed=0, since=T0 + 100)) == 3
    judged = store.sample(3, seed=0, model="small")
    store.add_feedback(Feedback(judged[0].id, "thumb", value=1))
    assert judged[0].id not in {r.id for r in store.sample(50, seed=0, without_feedback=True)}
    with pytest.raises(LmstackError, match="'stratify_by' must be one of"):
        store.sample(3, stratify_by="input")


def test_export_jsonl_writes_every_field_atomically(store, tmp_path):
    store.log_many([_row(2, meta={"k": "ü"}), _row(1, embedding=[0.5, 2.0]), _row(3, model="other")])
    out = tmp_path / "rows.jsonl"
    assert export_jsonl(store, out) == 3
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert lines == [interaction_to_dict(r) for r in store.rows()]
    assert [interaction_from_dict(d) for d in lines] == store.rows()
    assert lines[0]["embedding"] == [0.5, 2.0] and lines[1]["meta"] == {"k": "ü"}
    assert export_jsonl(store, out, model="other", since=T0) == 1
    assert [json.loads(x)["model"] for x in out.read_text().splitlines()] == ["other"]
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(LmstackError):
        export_jsonl(store, tmp_path / "blocker" / "rows.jsonl")
    assert out.read_text().count("\n") == 1


def test_export_with_feedback_joins_it_onto_its_rows(store, tmp_path):
    a, b, _ = store.log_many([_row(1, input="q"), _row(2, input="q"), _row(3)])
    store.add_feedback(Feedback(a, "thumb", value=1, time=T0 + 10))
    store.add_feedback(Feedback(b, "pairwise", other_id=a, value=-1, time=T0 + 11))
    out = tmp_path / "rows.jsonl"
    assert export_jsonl(store, out, with_feedback=True) == 3
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [[(f["kind"], f["value"]) for f in r["feedback"]] for r in rows] == [
        [("thumb", 1.0), ("pairwise", -1.0)], [("pairwise", -1.0)], []]
    assert rows[0]["feedback"][0] == {"interaction_id": a, "kind": "thumb", "value": 1.0, "text": None,
                                      "other_id": None, "time": T0 + 10, "user": None}


def test_export_is_what_the_drift_reader_reads(store, tmp_path):
    reader = pytest.importorskip("lmstack.monitor.rows", reason="the drift rows reader (monitor/rows.py) is absent")
    ids = store.log_many([_row(2, embedding=[0.5, 1.0]), _row(1)])
    store.add_feedback(Feedback(ids[0], "thumb", value=-1))
    export_jsonl(store, tmp_path / "rows.jsonl", with_feedback=True)
    got = reader.read_rows_jsonl(tmp_path / "rows.jsonl")
    assert [r["id"] for r in got] == [ids[1], ids[0]] and got[1]["embedding"] == [0.5, 1.0]
    assert reader.thumb(got[1]) == -1 and reader.thumb(got[0]) is None


def test_stats_count_per_model_and_day(store):
    ids = store.log_many([_row(0, latency_s=1.0), _row(60, latency_s=3.0), _row(86400), _row(5, model="z")])
    store.add_feedback(Feedback(ids[0], "thumb", value=1))
    store.add_feedback(Feedback(ids[1], "thumb", value=-1))
    store.add_feedback(Feedback(ids[1], "comment", text="meh"))
    assert store.stats() == [
        {"model": "m", "day": "2026-05-28", "interactions": 2, "mean_latency_s": 2.0, "feedback": 3,
         "thumbs_up": 1, "thumbs_down": 1},
        {"model": "m", "day": "2026-05-29", "interactions": 1, "mean_latency_s": 0.0, "feedback": 0,
         "thumbs_up": 0, "thumbs_down": 0},
        {"model": "z", "day": "2026-05-28", "interactions": 1, "mean_latency_s": 0.0, "feedback": 0,
         "thumbs_up": 0, "thumbs_down": 0}]


# ---------------------------------------------------------------------------------------------------- schema


def _missing_column_errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg
    except ImportError:
        return (sqlite3.OperationalError,)
    return (sqlite3.OperationalError, psycopg.errors.UndefinedColumn)


def test_a_v1_store_is_upgraded_to_the_latest_at_open(store_url):
    old = store_for(store_url)
    assert old.migrate(to=1) == 1 and old.schema_version() == 1
    old._exec('INSERT INTO interactions ("id", "time", "model", "input", "output") VALUES '
              "('v1row', 1780000000.5, 'm', 'hi', 'yo')")
    with pytest.raises(_missing_column_errors()):    # v1 has no arm column: today's writer cannot write into it
        old.log(_row(0, arm="A"))
    old.close()
    s = open_store(store_url)
    assert s.schema_version() == SCHEMA_VERSION == 2
    got = s.get("v1row")
    assert (got.time, got.input, got.output, got.arm, got.request) == (1780000000.5, "hi", "yo", None, {})
    s.log(_row(0, arm="A"))
    assert [r.arm for r in s.rows(arm="A")] == ["A"]
    assert s.migrate() == SCHEMA_VERSION   # idempotent
    s._exec('INSERT INTO schema_version ("version", "applied") VALUES (99, 0)')
    s.close()
    with pytest.raises(LmstackError, match="schema version 99, newer than this lmstack's 2; upgrade lmstack"):
        open_store(store_url)


def test_json_columns_are_text_in_sqlite_and_jsonb_in_postgres(store):
    store.log(_row(0, id="j", meta={"judge": 4}, embedding=[1.0]))
    if isinstance(store, SQLiteStore):
        kinds = store._read('SELECT typeof("request"), typeof("meta"), typeof("embedding") FROM interactions')
        assert kinds == [("text", "text", "blob")]
        assert store._read('SELECT json_extract("meta", \'$.judge\') FROM interactions') == [(4,)]
    else:
        kinds = store._read("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = "
                            "'interactions' AND column_name IN ('request', 'params', 'meta', 'embedding') "
                            "ORDER BY column_name")
        assert kinds == [("embedding", "bytea"), ("meta", "jsonb"), ("params", "jsonb"), ("request", "jsonb")]
        assert store._read("""SELECT ("meta"->>'judge')::int FROM interactions""") == [(4,)]


def test_a_finished_threads_connection_is_closed(store):
    import gc

    store.count()   # this thread's connection

    def one_write(k):
        store.log(_row(k))

    threads = [threading.Thread(target=one_write, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    del t
    gc.collect()
    assert store.count() == 20 and len(store._held) == 1   # only this thread's is left
    if isinstance(store, PostgresStore):
        sessions = store._read("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        assert sessions == [(1,)]


def test_a_killed_postgres_connection_is_one_error_then_reconnected(pg_server):
    import psycopg
    from monitor_pg import fresh_database

    store = open_store(fresh_database(pg_server))
    store.log(_row(0))
    pid = store._read("SELECT pg_backend_pid()")[0][0]
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(LmstackError, match="lost the connection to PostgreSQL .*; the next call reconnects"):
        store.log(_row(1))
    store.log(_row(2))
    assert store.count() == 2 and store._read("SELECT pg_backend_pid()")[0][0] != pid
    store.close()


def test_stores_opening_together_migrate_once(store_url):
    errors, stores = [], []

    def opener():
        try:
            stores.append(open_store(store_url))
        except Exception as e:  # noqa: BLE001 (collected: a failed open is the finding)
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(stores) == 8
    versions = stores[0]._read('SELECT "version" FROM schema_version ORDER BY "version"')
    assert [v[0] for v in versions] == [1, 2]
    for s in stores:
        s.close()


# ---------------------------------------------------------------------------------------------------- URLs


def test_url_forms(tmp_path):
    assert isinstance(store_for(tmp_path / "a.db"), SQLiteStore)
    assert store_for(f"sqlite://{tmp_path}/b.db").path == tmp_path / "b.db"
    assert store_for("sqlite://rel.db").path.as_posix() == "rel.db"
    assert isinstance(store_for("postgresql://u@h/db"), PostgresStore)
    assert isinstance(store_for("postgres://u@h/db"), PostgresStore)
    with pytest.raises(LmstackError, match="unknown scheme 'mysql'; use postgresql://"):
        store_for("mysql://u:pw@h/db")
    with pytest.raises(LmstackError, match="in-memory SQLite store is not shared"):
        store_for("sqlite://:memory:")
    with pytest.raises(LmstackError, match="is a folder; give the log store a file path"):
        open_store(tmp_path)
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(LmstackError, match="junk.db: cannot open the SQLite log store"):
        open_store(tmp_path / "junk.db")
    s = open_store(tmp_path / "deep" / "er" / "c.db")   # folders are created
    assert s.count() == 0 and s.url == f"sqlite://{tmp_path}/deep/er/c.db"
    s.close()
    with pytest.raises(LmstackError, match="the store is closed"):
        s.count()


def test_redact_url_hides_the_password():
    assert redact_url("postgresql://bob:s3cret@db.example:5433/logs?sslmode=require") == \
        "postgresql://bob:***@db.example:5433/logs?sslmode=require"
    assert redact_url("postgresql://bob@db/logs") == "postgresql://bob@db/logs"


def test_unreachable_postgres_is_one_line_naming_the_url_without_password():
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as sock:   # a port nobody listens on: refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://bob:s3cret@127.0.0.1:{port}/logs"
    with pytest.raises(LmstackError) as e:
        open_store(url)
    msg = str(e.value)
    assert msg.startswith(f"postgresql://bob:***@127.0.0.1:{port}/logs: cannot connect to PostgreSQL (")
    assert msg.endswith("start the server or fix host, port, user, password or database in the URL")
    assert "s3cret" not in msg and "\n" not in msg


def test_store_reads_a_non_lmstack_sqlite_file(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    s = store_for(path)
    with pytest.raises(LmstackError, match="not an lmstack log store"):
        s.count()
    s.close()


# ---------------------------------------------------------------------------------------------------- concurrency

WRITERS, DURATION_S = 32, 2.0


def _write_until(store, deadline: float, tag: str) -> int:
    n = 0
    while time.time() < deadline:
        store.log(_row(n, model=tag, input=f"{tag} {n}"))
        n += 1
    return n


def _process_writer(url: str, start, deadline_box, tag: str, out) -> None:
    store = open_store(url)
    start.wait()
    out.put((tag, _write_until(store, deadline_box.value, tag)))
    store.close()


def test_32_threads_writing_at_once_lose_no_row(store_url):
    store = open_store(store_url)
    counts: dict[str, int] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(WRITERS)

    def writer(tag: str) -> None:
        try:
            go.wait()
            counts[tag] = _write_until(store, time.time() + DURATION_S, tag)
        except BaseException as e:  # noqa: BLE001 (collected: a failed writer is the finding)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(f"t{i}",)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(counts) == WRITERS and min(counts.values()) > 0
    assert store.count() == sum(counts.values())
    per_writer = {}
    for r in store.iter_rows():
        per_writer[r.model] = per_writer.get(r.model, 0) + 1
    assert per_writer == counts
    store.close()


def test_32_processes_writing_at_once_lose_no_row(store_url):
    open_store(store_url).close()        # created and migrated once; the writers only open it
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    deadline = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_process_writer, args=(store_url, start, deadline, f"p{i}", out))
             for i in range(WRITERS)]
    for p in procs:
        p.start()
    deadline.value = time.time() + DURATION_S + 1.0   # a second for every child to connect first
    start.set()
    counts = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * WRITERS and min(counts.values()) > 0
    store = open_store(store_url)
    assert store.count() == sum(counts.values())
    assert {m: n for m, n in counts.items()} == {
        m: len(store.rows(model=m)) for m in counts}
    store.close()


BATCH = 50


def _batch_writer(url: str, fd: int) -> None:
    store = open_store(url)
    n = 0
    while True:   # until killed: each commit of a batch of rows is reported with one byte
        store.log_many([_row(n * BATCH + k, input=f"batch {n}") for k in range(BATCH)])
        os.write(fd, b".")
        n += 1


def test_a_writer_killed_mid_write_leaves_the_store_consistent(store_url):
    open_store(store_url).close()
    r, w = os.pipe()
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_batch_writer, args=(store_url, w))
    p.start()
    os.close(w)
    committed = 0
    while committed < 5:
        committed += len(os.read(r, 1))
    os.kill(p.pid, signal.SIGKILL)
    p.join(timeout=30)
    assert p.exitcode == -signal.SIGKILL
    while chunk := os.read(r, 4096):   # bytes written before the kill
        committed += len(chunk)
    os.close(r)
    store = open_store(store_url)
    n = store.count()
    # every reported batch is there, a batch in flight at the kill is all there (committed, not yet reported)
    # or not at all: never part of one
    assert n in (committed * BATCH, (committed + 1) * BATCH), (n, committed)
    assert all(len(store.rows(input=f"batch {b}")) == BATCH for b in range(committed))
    if isinstance(store, SQLiteStore):
        assert store.integrity_check() == "ok"
    store.log(_row(0, id="after"))
    assert store.count() == n + 1 and store.get("after").model == "m"
    store.close()



def test_a_server_that_never_answers_times_out(monkeypatch):
    """A host that takes the TCP connection and says nothing (a firewall, a hung server): connect_timeout ends
    the wait with the same one-line error."""
    pytest.importorskip("psycopg")
    import socket

    monkeypatch.setattr(PostgresStore, "CONNECT_TIMEOUT_S", 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)   # accepted by the kernel, never read: the PostgreSQL handshake waits for ever
        port = sock.getsockname()[1]
        with pytest.raises(LmstackError, match=rf"127\.0\.0\.1:{port}/logs: cannot connect to PostgreSQL \(.*time"):
            open_store(f"postgresql://bob@127.0.0.1:{port}/logs")
