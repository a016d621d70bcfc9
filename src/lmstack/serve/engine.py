"""The serving scheduler: one :class:`lmstack.infer.batch.Batch` driven by a background thread.

    engine = Engine(model, tokenizer, max_batch=8, max_queue=64).start()
    req = engine.submit(prompt_ids, GenerationConfig(max_new_tokens=32))     # QueueFull when the queue is full
    for token, finished in req.tokens():        # or: async for ... in req.atokens() (submit(..., loop=loop))
        ...
    req.finish_reason                           # "stop" / "length" (None: cancelled or failed)
    req.cancel()                                # the client left: retired at the next step, its slot freed
    engine.stop()

Iteration-level scheduling: before every ``Batch.step`` the thread retires cancelled requests and admits
waiting ones into free slots (each with its own GenerationConfig: sampling, seed, stops), so requests
join and leave the running batch between decode steps. The prompt ids and config come from the caller;
the server builds them with :func:`lmstack.infer.text._prepare`, the rule every text front-end follows.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lmstack.errors import LmstackError
from lmstack.infer.batch import Batch, BatchSequence
from lmstack.infer.config import GenerationConfig


class QueueFull(LmstackError):
    """The request queue is at ``max_queue``: retry later (the server answers 429)."""


class RequestTimeout(LmstackError):
    """The request ran past the engine's ``request_timeout`` (waiting included); its slot was freed."""


SCHEDULING = ("continuous", "static")


_DONE = object()


class Request:
    """One submitted prompt: its generated ids arrive through a per-request queue (thread or asyncio)."""

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, loop: asyncio.AbstractEventLoop | None):
        self.prompt_ids, self.config, self.loop = prompt_ids, config, loop
        self._q: Any = asyncio.Queue() if loop is not None else queue.Queue()
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.seq_id: int | None = None
        self.seq: BatchSequence | None = None      # the batch's record: tokens, logprobs (read by the server)

    def cancel(self) -> None:
        """Drop the request (the client is gone); the engine retires it before its next step."""
        self.cancelled = True

    def _emit(self, item: Any) -> None:
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._q.put_nowait, item)
            except RuntimeError:   # the loop is closed: nobody is listening any more
                self.cancelled = True
        else:
            self._q.put(item)

    def _check(self, item: Any) -> bool:
        if item is _DONE:
            if self.error is not None:
                raise self.error
            return False
        return True

    def tokens(self) -> Iterator[tuple[int, bool]]:
        """``(token id, finished)`` per generated id, from a thread (``submit`` without a loop)."""
        while self._check(item := self._q.get()):
            yield item

    async def atokens(self) -> AsyncIterator[tuple[int, bool]]:
        """``(token id, finished)`` per generated id, in the loop given to ``submit``."""
        while self._check(item := await self._q.get()):
            yield item


# upper bounds (seconds) of the latency histograms' buckets, Prometheus style (cumulative, then +Inf)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    """Counts of observations per latency bucket, their sum and count (a Prometheus histogram)."""

    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        self.count += 1
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break

    def cumulative(self) -> list[tuple[str, int]]:
        out, run = [], 0
        for bound, c in zip(LATENCY_BUCKETS, self.counts):
            run += c
            out.append((repr(bound), run))
        return out + [("+Inf", self.count)]


@dataclass
class Metrics:
    """Counters for ``/metrics``."""

    queue_length: int = 0
    running: int = 0
    requests_total: int = 0
    tokens_total: int = 0
    cancelled_total: int = 0            # requests dropped before they finished (client gone)
    timeouts_total: int = 0             # requests stopped at the request timeout
    ttft: Histogram = field(default_factory=Histogram)       # submission -> first token
    itl: Histogram = field(default_factory=Histogram)        # gaps between a request's tokens
    recent: collections.deque = field(default_factory=collections.deque)   # (time, tokens) per step, last 10 s

    WINDOW = 10.0   # seconds of steps kept for tokens/s

    def record_step(self, now: float, tokens: int) -> None:
        """Note one decode step; steps older than the window are dropped here, so a server nobody scrapes does
        not keep one entry per step forever."""
        self.recent.append((now, tokens))
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - self.WINDOW:
            self.recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last ``WINDOW`` seconds."""
        self._prune(time.monotonic())
        return sum(n for _, n in self.recent) / self.WINDOW


class Engine:
    """Owns one :class:`Batch` of ``max_batch`` slots and a bounded queue of ``max_queue`` waiting requests."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_batch: int = 8, max_queue: int = 64,
                 max_len: int | None = None, scheduling: str = "continuous", request_timeout: float | None = None,
                 prefill_chunk: int | None = 256, prefix_cache_tokens: int = 4096,
                 cond: threading.Condition | None = None):
        if max_queue < 0:
            raise LmstackError(f"max_queue: must be >= 0, got {max_queue}")
        if scheduling not in SCHEDULING:
            raise LmstackError(f"scheduling: must be one of {', '.join(SCHEDULING)}, got {scheduling!r}")
        if request_timeout is not None and request_timeout <= 0:
            raise LmstackError(f"request_timeout: must be > 0 seconds, got {request_timeout}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.max_len = max_batch, max_queue, max_len
        # continuous: waiting requests join the running batch at every step; static: only when it is empty
        # (the batch runs until its longest request ends: the baseline continuous batching improves on)
        self.scheduling, self.request_timeout = scheduling, request_timeout
        # chunked prefill: at most this many prompt ids per step, so a long prompt does not stall the others;
        # prefix caching: finished prefills kept (up to this many positions) for prompts that share a prefix
        self.prefill_chunk, self.prefix_cache_tokens = prefill_chunk, prefix_cache_tokens
        self.metrics = Metrics()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}
        self._cond = cond or threading.Condition()   # shared between engines that one thread runs (run_many)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.batch: Batch | None = None

    # ----- the caller's side

    def start(self) -> Engine:
        """Run the scheduler in a background thread (tests, notebooks, a second A/B arm)."""
        self.batch = self._new_batch()
        self._thread = threading.Thread(target=self._loop, name="lmstack-serve-engine", daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def run_many(engines: Sequence[Engine]) -> None:
        """Run several engines' schedulers in the calling thread, one iteration each in turn, until any is
        stopped (``lmstack serve`` with an A/B candidate: both arms' forwards in the main thread, so their
        latencies compare). The engines must share one condition (``Engine(..., cond=shared)``)."""
        cond = engines[0]._cond
        if any(e._cond is not cond for e in engines):
            raise LmstackError("Engine.run_many: the engines must share one condition (cond=)")
        for e in engines:
            e.batch = e._new_batch()
        try:
            while True:
                done = [e._iterate(block=False) for e in engines]
                if False in done:
                    break
                if all(d is None for d in done):
                    with cond:
                        while all(e._idle() for e in engines):
                            cond.wait()
        finally:
            for e in engines:
                e._release_all()

    def run(self) -> None:
        """Run the scheduler in the calling thread until :meth:`stop` (``lmstack serve`` runs it in the main
        thread). Why: with PyTorch's OpenMP pool, the ops of a thread other than the first one that ran parallel
        work are about 2x slower on a 2-core CPU (measured: an 8-layer decode step 5.2 ms in the main thread,
        10.0 ms in a new one), so the model's forwards belong in the thread that loaded it."""
        self.batch = self._new_batch()
        self._loop()

    def _new_batch(self) -> Batch:
        return Batch(self.model, self.max_batch, self.max_len, tokenizer=self.tokenizer,
                     prefill_chunk=self.prefill_chunk, prefix_cache_tokens=self.prefix_cache_tokens)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def submit(self, prompt_ids: Sequence[int], config: GenerationConfig,
               loop: asyncio.AbstractEventLoop | None = None) -> Request:
        """Queue a prompt; raises :class:`QueueFull` when ``max_queue`` requests already wait."""
        req = Request(list(prompt_ids), config, loop)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append(req)
            self.metrics.queue_length = len(self._waiting)
            self.metrics.requests_total += 1
            self._cond.notify_all()
        return req

    # ----- the engine thread

    def _loop(self) -> None:
        while self._iterate(block=True):
            pass
        self._release_all()

    def _release_all(self) -> None:
        for req in list(self._running.values()) + list(self._waiting):   # shutting down: release every caller
            req.error = LmstackError("the server is shutting down")
            req._emit(_DONE)

    def _idle(self) -> bool:
        return not self._stopping and not self._waiting and not self._running

    def _iterate(self, block: bool) -> bool | None:
        """One scheduling iteration: admit, step, deliver. False when stopping; None when there was nothing to do
        (only with ``block=False``; ``block=True`` waits for work instead)."""
        batch = self.batch
        assert batch is not None
        with self._cond:
            while block and self._idle():
                self._cond.wait()
            if self._stopping:
                return False
            if self._idle():
                return None
            admit = []
            self._expire()
            self._retire_cancelled(batch)
            may_admit = self.scheduling == "continuous" or not self._running
            while may_admit and self._waiting and batch.free_slots - len(admit) > 0:
                req = self._waiting.popleft()
                if req.cancelled:
                    req._emit(_DONE)
                else:
                    admit.append(req)
            self.metrics.queue_length = len(self._waiting)
        for req in admit:
            self._admit(batch, req)
        with self._cond:
            self._retire_cancelled(batch)
            self.metrics.running = len(self._running)
        if not self._running:
            return True
        try:
            events = batch.step()
        except Exception as e:  # noqa: BLE001  (a bug: its callers get it, a 500; the traceback is logged)
            traceback.print_exc()
            self._reset(e)
            return True
        now = time.monotonic()
        self.metrics.record_step(now, len(events))
        for seq_id, token, finished in events:
            req = self._running[seq_id]
            if req.first_token_at is None:
                req.first_token_at = now
                self.metrics.ttft.observe(now - req.submitted)
            else:
                self.metrics.itl.observe(now - req.last_token_at)
            req.last_token_at = now
            req.token_ids.append(token)
            self.metrics.tokens_total += 1
            req._emit((token, finished))
            if finished:
                self._finish(batch, req)
        with self._cond:
            self.metrics.running = len(self._running)
        return True

    def _reset(self, error: Exception) -> Batch:
        """Fail every running request with ``error`` and start a fresh batch (the old one's state is suspect)."""
        for req in self._running.values():
            req.error = error
            req._emit(_DONE)
        self._running.clear()
        self.batch = self._new_batch()
        return self.batch

    def _admit(self, batch: Batch, req: Request) -> None:
        try:
            req.seq_id = batch.add(req.prompt_ids, req.config)
        except Exception as e:  # noqa: BLE001  (a bad prompt or config fails that request; the others go on)
            if not isinstance(e, LmstackError):   # a bug: keep its traceback in the log
                traceback.print_exc()
            req.error = e
            req._emit(_DONE)
            return
        self._running[req.seq_id] = req
        req.seq = batch.sequences[req.seq_id]
        if req.seq.finished:   # no room for a single new token
            self._finish(batch, req)

    def _finish(self, batch: Batch, req: Request) -> None:
        seq = batch.retire(req.seq_id)
        del self._running[req.seq_id]
        req.finish_reason = seq.finish_reason
        req._emit(_DONE)

    def _expire(self) -> None:
        """Cancel every request older than ``request_timeout`` (waiting or running), with a timeout error."""
        if self.request_timeout is None:
            return
        limit = time.monotonic() - self.request_timeout
        late = [r for r in list(self._running.values()) + list(self._waiting)
                if r.submitted < limit and not r.cancelled]
        for req in late:
            req.error = RequestTimeout(f"the request ran past the server's {self.request_timeout:g} s timeout")
            req.cancel()                                   # a running one is retired by _retire_cancelled
            self.metrics.timeouts_total += 1
            if req in self._waiting:
                self._waiting.remove(req)
                req._emit(_DONE)

    def _retire_cancelled(self, batch: Batch) -> None:
        for seq_id, req in list(self._running.items()):
            if req.cancelled:
                batch.retire(seq_id)
                del self._running[seq_id]
                self.metrics.cancelled_total += 1
                req._emit(_DONE)
