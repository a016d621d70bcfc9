"""The background writer: rows submitted from many threads all land (both stores); a store that goes down is
retried with the rows kept, and writing resumes when it is back; a full queue drops and counts; a duplicate
is dropped while the rest of its batch is written; a malformed row is refused at submit."""

from __future__ import annotations

import threading

import pytest

from lmstack.monitor.store import FieldError, Interaction, open_store
from lmstack.monitor.writer import BackgroundWriter

pytest_plugins = ("monitor_pg",)   # the store_url fixture: SQLite and PostgreSQL

T0 = 1_780_000_000.0


def _row(i, **kw):
    return Interaction(**({"id": "", "time": T0 + i, "model": "m", "input": f"q{i}", "output": "a"} | kw))


def test_rows_from_many_threads_all_land(store_url):
    store = open_store(store_url)
    writer = BackgroundWriter(store, batch=16).start()
    ids: list[str] = []
    lock = threading.Lock()

    def serve(k):
        for j in range(25):
            i = writer.submit(_row(k * 100 + j))
            with lock:
                ids.append(i)

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert writer.stats.written == 200 and store.count() == 200
    assert sorted(r.id for r in store.rows()) == sorted(ids)
    store.close()


class FlakyStore:
    """A store that fails while ``down`` is set, then writes into a real one."""

    def __init__(self, real):
        self.real, self.url, self.down, self.calls = real, real.url, True, 0

    def log_many(self, rows):
        self.calls += 1
        if self.down:
            raise ConnectionError("server closed the connection unexpectedly")
        return self.real.log_many(rows)

    def log(self, row):
        return self.log_many([row])[0]


def test_a_store_that_goes_down_is_retried_and_nothing_is_lost(tmp_path, capfd):
    real = open_store(tmp_path / "log.db")
    flaky = FlakyStore(real)
    writer = BackgroundWriter(flaky, retry_s=0.01).start()
    for i in range(10):
        writer.submit(_row(i))
    assert not writer.flush(timeout=0.2)          # still failing: the rows wait
    assert writer.stats.failures >= 2 and writer.stats.written == 0 and real.count() == 0
    flaky.down = False
    assert writer.flush(timeout=30)
    writer.close()
    assert real.count() == 10 and writer.stats.written == 10 and writer.stats.dropped_full == 0
    err = capfd.readouterr().err.splitlines()
    assert err[0].startswith(f"warning: log store {real.url}: server closed the connection unexpectedly; keeping ")
    assert err[1:] == [f"log store {real.url}: writing again"]     # one warning per outage, not per retry
    real.close()


class BlockingStore:
    """A store whose writes wait for ``release``; ``entered`` is set when the first write starts."""

    def __init__(self, real):
        self.real, self.url = real, real.url
        self.entered, self.release = threading.Event(), threading.Event()

    def log_many(self, rows):
        self.entered.set()
        self.release.wait(30)
        return self.real.log_many(rows)

    def log(self, row):
        return self.log_many([row])[0]


def test_a_full_queue_drops_and_counts(tmp_path):
    real = open_store(tmp_path / "log.db")
    slow = BlockingStore(real)
    writer = BackgroundWriter(slow, max_queue=2).start()
    writer.submit(_row(0))
    assert slow.entered.wait(30)                   # the thread holds row 0 in a write
    ids = [writer.submit(_row(i)) for i in range(1, 6)]
    assert writer.stats.dropped_full == 3 and len(set(ids)) == 5
    slow.release.set()
    writer.close()
    assert real.count() == 3 and writer.stats.written == 3
    real.close()


def test_a_duplicate_is_dropped_and_the_rest_of_its_batch_written(tmp_path):
    store = open_store(tmp_path / "log.db")
    store.log(_row(0, id="taken"))
    slow = BlockingStore(store)
    writer = BackgroundWriter(slow).start()
    writer.submit(_row(1))
    assert slow.entered.wait(30)
    for i, id_ in enumerate(["a", "taken", "b"]):   # queued together: one batch
        writer.submit(_row(2 + i, id=id_))
    slow.release.set()
    writer.close()
    assert writer.stats.dropped_refused == 1 and writer.stats.written == 3
    assert store.count() == 4 and {"taken", "a", "b"} <= {r.id for r in store.rows()}
    store.close()


def test_close_gives_up_on_a_store_that_stays_down(tmp_path):
    real = open_store(tmp_path / "log.db")
    flaky = FlakyStore(real)
    writer = BackgroundWriter(flaky, retry_s=0.01).start()
    writer.submit(_row(0))
    writer.submit(_row(1))
    writer.close(timeout=0.3)        # returns, and the thread ends: the rows are counted as abandoned
    assert writer._thread is None and writer.stats.abandoned == 2
    assert real.count() == 0 and writer.stats.written == 0 and writer.stats.failures > 0
    real.close()


def test_a_malformed_row_is_refused_at_submit(tmp_path):
    store = open_store(tmp_path / "log.db")
    writer = BackgroundWriter(store)   # not started: submit still checks
    with pytest.raises(FieldError, match="'model' must be"):
        writer.submit(_row(0, model=""))
    with pytest.raises(FieldError, match="'params' must hold JSON values only"):
        writer.submit(_row(0, params={"x": object()}))
    with pytest.raises(FieldError, match="'prompt_tokens' must be a count"):
        writer.submit(_row(0, prompt_tokens=2 ** 40))
    store.close()


def test_interaction_from_an_openai_request():
    from lmstack.monitor.store import interaction_from_request, request_input

    chat = {"model": "stories", "temperature": 0.2, "max_tokens": 9, "user": "u7",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                         {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": [{"type": "text", "text": "sec"}, {"type": "text", "text": "ond"}]}]}
    row = interaction_from_request(chat, "reply", model="stories", time=T0, finish_reason="stop", prompt_tokens=12,
                                   completion_tokens=3, latency_s=0.5, ttft_s=0.1, arm="B")
    assert (row.input, row.output, row.user, row.arm, row.time) == ("second", "reply", "u7", "B", T0)
    assert row.params == {"temperature": 0.2, "max_tokens": 9} and row.request == chat and row.id == ""
    assert request_input({"prompt": "Once upon"}) == "Once upon" == request_input({"prompt": ["Once upon"]})
    assert request_input({"prompt": [1, 2, 3]}) == "[1, 2, 3]" and request_input({}) == ""
    with pytest.raises(FieldError, match="'completion_tokens' must be a count"):
        interaction_from_request(chat, "x", model="m", completion_tokens=-1)
