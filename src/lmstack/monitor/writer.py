"""Logging off the request path: a server hands rows to a queue, a thread writes them in batches.

    writer = BackgroundWriter(open_store(url)).start()
    id_ = writer.submit(row)          # never blocks; the id is known at once (send it to the client for feedback)
    ...
    writer.close()                    # drains what is queued, then stops

A store that fails (a PostgreSQL server gone, a disk full) must not take the server down with it: the writer
keeps the batch it could not write and retries every ``retry_s``, printing one warning when the store starts
failing and one when it recovers; while it is down, rows beyond ``max_queue`` are dropped and counted rather
than held without bound. A row whose id the store already holds is dropped and counted (after a broken
connection it may be one whose commit went through), and the rest of its batch is written. :attr:`stats` says how many were written and dropped.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Self

from lmstack.monitor.store import DuplicateInteraction, Interaction, new_interaction_id, validate_interaction


@dataclasses.dataclass
class WriterStats:
    written: int = 0
    dropped_full: int = 0      # submitted while the queue was full
    dropped_refused: int = 0   # refused by a working store (an id it already holds, a value it cannot take)
    failures: int = 0          # batches that failed (each retried)
    abandoned: int = 0         # still unwritten when close() gave up on a store that stayed down
    last_error: str = ""


class BackgroundWriter:
    """See the module docstring. Constructing one starts nothing; :meth:`start` starts the thread."""

    def __init__(self, store: Any, max_queue: int = 10_000, batch: int = 256, retry_s: float = 1.0):
        self.store, self.batch, self.retry_s = store, batch, retry_s
        self.stats = WriterStats()
        self._queue: queue.Queue[Interaction | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._abandon = threading.Event()
        self._count_lock = threading.Lock()

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmstack-log-writer", daemon=True)
            self._thread.start()
        return self

    def submit(self, row: Interaction) -> str:
        """Queue ``row`` (a new id when its ``id`` is empty) and return its id; a malformed row raises here."""
        validate_interaction(row)
        if not row.id:
            row = dataclasses.replace(row, id=new_interaction_id())
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            with self._count_lock:   # submit runs on many request threads
                self.stats.dropped_full += 1
        return row.id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued row is written or dropped; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left if left is not None else 0.1)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (waiting up to ``timeout`` s; what a store still down leaves unwritten then is
        counted in ``stats.abandoned``), then stop the thread."""
        if self._thread is None:
            return
        if not self.flush(timeout):
            # the store is still down: give up on what is left (counted), so the thread ends
            self._abandon.set()
            while True:
                try:
                    if self._queue.get_nowait() is not None:
                        self.stats.abandoned += 1
                    self._queue.task_done()
                except queue.Empty:
                    break
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    # -- the thread

    def _take(self) -> list[Interaction] | None:
        first = self._queue.get()
        if first is None:
            self._queue.task_done()
            return None
        rows = [first]
        while len(rows) < self.batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:   # put the stop mark back for the next turn
                self._queue.task_done()
                self._queue.put(None)
                break
            rows.append(nxt)
        return rows

    def _done(self, n: int) -> None:
        for _ in range(n):
            self._queue.task_done()
        with self._idle:
            self._idle.notify_all()

    def _note(self, e: Exception) -> None:
        self.stats.last_error = " ".join(str(e).split())[:300] or type(e).__name__

    def _write(self, rows: Sequence[Interaction]) -> list[Interaction]:
        """Write ``rows``; the ones still to write (all of them when the store is down)."""
        try:
            self.store.log_many(rows)
            self.stats.written += len(rows)
            return []
        except Exception as e:  # noqa: BLE001 (the store's failure must not end the thread)
            self.stats.failures += 1
            self._note(e)
        # one at a time: a duplicate is dropped (it may be a row whose commit went through before a connection
        # broke), the rest written. When some went in, the store works and the ones it refused are bad rows
        # (dropped); when none did, the store is down and they all wait for the next try
        left, progress = [], False
        for row in rows:
            try:
                self.store.log(row)
                self.stats.written += 1
                progress = True
            except DuplicateInteraction as e:
                self.stats.dropped_refused += 1
                self._note(e)
                progress = True
            except Exception as e:  # noqa: BLE001
                self._note(e)
                left.append(row)
        if progress:
            self.stats.dropped_refused += len(left)
            return []
        return left

    def _run(self) -> None:
        down = False
        while True:
            rows = self._take()
            if rows is None:
                return
            taken, left = len(rows), self._write(rows)
            while left:
                if self._abandon.is_set():
                    self.stats.abandoned += len(left)
                    break
                if not down:
                    print(f"warning: log store {self.store.url}: {self.stats.last_error}; keeping "
                          f"{len(left)} rows and retrying every {self.retry_s:g} s", file=sys.stderr)
                    down = True
                time.sleep(self.retry_s)
                left = self._write(left)
            if down:
                print(f"log store {self.store.url}: writing again", file=sys.stderr)
                down = False
            self._done(taken)
