"""The interaction log: one row per request/response, and the feedback people give on it.

    store = open_store("sqlite:///var/lmstack/log.db")      # or a plain path, or "postgresql://user@host/db"
    id_ = store.log(Interaction(id="", time=time.time(), model="stories", input="hi", output="hello"))
    store.add_feedback(Feedback(id_, "thumb", value=1))
    rows = store.rows(since=time.time() - 86400, model="stories")

Two backends behind the one :class:`LogStore` protocol:

- :class:`SQLiteStore`, embedded (the default): WAL journal, a busy timeout, one connection per thread (and
  per process: a forked child opens its own), every write one ``BEGIN IMMEDIATE`` transaction. Many threads
  and processes may write at once; a writer killed mid-transaction leaves nothing half-written.
- :class:`PostgresStore` (``psycopg`` 3, the ``monitor`` extra), for a fleet of servers writing to one store:
  one connection per thread and process, each write one transaction.

Both keep the same schema, built by an ordered list of migrations per backend (``schema_version`` records the
ones applied; :meth:`migrate` applies the missing ones in one transaction at open, under a lock, so servers
starting together migrate once). JSON fields (``request``, ``params``, ``meta``) are text in SQLite and
``jsonb`` in PostgreSQL; the embedding is stored as little-endian float32 bytes and read back as floats (so a
value comes back rounded to float32). Retention is :meth:`prune`, review sampling :meth:`sample`, export
:func:`export_jsonl` (the drift readers' row format: each :class:`Interaction` field as JSON).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sqlite3
import sys
import threading
import time as _time
import urllib.parse
import uuid
import weakref
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, Self

from lmstack.errors import LmstackError

# ----------------------------------------------------------------------------------------------------
# rows


@dataclass
class Interaction:
    """One request and its response, as served."""

    id: str                      # uuid4 hex; new_interaction_id() assigns one when empty
    time: float                  # unix seconds (UTC)
    model: str                   # model id as served
    model_version: str = ""      # e.g. the run folder's hash or the checkpoint step
    prompt_name: str | None = None
    prompt_version: int | None = None
    route: str | None = None
    arm: str | None = None       # the A/B arm when an experiment routed the request
    user: str | None = None
    session: str | None = None
    input: str = ""              # the rendered prompt text or the last user message
    request: dict = field(default_factory=dict)   # the request body as received (messages, params)
    output: str = ""             # the reply text
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    params: dict = field(default_factory=dict)    # sampling parameters
    embedding: list[float] | None = None          # the input's embedding (optional)
    meta: dict = field(default_factory=dict)      # anything else (judge scores, safety flags)


FEEDBACK_KINDS = ("thumb", "comment", "pairwise")


@dataclass
class Feedback:
    """A person's judgement of one interaction.

    ``thumb``: ``value`` +1 (up) or -1 (down). ``comment``: ``text``. ``pairwise``: two answers to one prompt,
    ``interaction_id`` and ``other_id``; ``value`` +1 when ``interaction_id``'s answer is preferred, -1 when
    ``other_id``'s is, 0 for a tie.
    """

    interaction_id: str
    kind: str
    value: float | None = None
    text: str | None = None
    other_id: str | None = None
    time: float = 0.0            # 0: the store stamps the time it is added
    user: str | None = None


FIELDS = tuple(f.name for f in dataclasses.fields(Interaction))
JSON_FIELDS = ("request", "params", "meta")
FEEDBACK_FIELDS = tuple(f.name for f in dataclasses.fields(Feedback))
# fields a review sample may be stratified by
STRATA = ("model", "model_version", "prompt_name", "prompt_version", "route", "arm", "user", "session",
          "finish_reason")


class FieldError(LmstackError):
    """A row or payload field that is missing or has the wrong type or value; ``field`` names it."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class UnknownInteraction(LmstackError):
    """An interaction id that is not in the store; ``field`` names the field that carried it."""

    def __init__(self, message: str, field: str = "interaction_id"):
        super().__init__(message)
        self.field = field


class DuplicateInteraction(LmstackError):
    """An interaction id that is already logged."""


def new_interaction_id() -> str:
    return uuid.uuid4().hex


def interaction_to_dict(row: Interaction) -> dict[str, Any]:
    """The JSON form of a row (the export format: every field, ``time`` in unix seconds)."""
    return dataclasses.asdict(row)


def interaction_from_dict(d: dict[str, Any], where: str = "row") -> Interaction:
    """The :class:`Interaction` of a JSON object with its fields (unknown keys are an error naming them)."""
    if not isinstance(d, dict):
        raise LmstackError(f"{where}: expected a JSON object with Interaction fields, got {type(d).__name__}")
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise LmstackError(f"{where}: unknown Interaction field(s) {unknown}; the fields are {list(FIELDS)}")
    missing = [k for k in ("time", "model") if k not in d]
    if missing:
        raise LmstackError(f"{where}: an interaction needs {missing}")
    row = Interaction(**{"id": "", **d})
    validate_interaction(row, where)
    return row


# the request fields that are sampling parameters (copied into Interaction.params)
SAMPLING_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                   "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "response_format", "stream")


def request_input(body: dict[str, Any]) -> str:
    """The input of an OpenAI-style request body: the last user message of ``messages`` (text parts joined),
    else ``prompt`` (a string; a list of token ids as JSON), else ""."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in reversed(msgs):
            if isinstance(m, dict) and m.get("role") == "user":
                c = m.get("content")
                if isinstance(c, list):
                    return "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
                return c if isinstance(c, str) else ""
        return ""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        return p[0]
    return p if isinstance(p, str) else (json.dumps(p) if p is not None else "")


def interaction_from_request(body: dict[str, Any], output: str, *, model: str, time: float | None = None,
                             **fields: Any) -> Interaction:
    """The row a server logs for one request: ``input`` from the body (:func:`request_input`), ``request`` the
    body itself, ``params`` its sampling fields; ``fields`` sets the rest (finish_reason, prompt_tokens,
    completion_tokens, latency_s, ttft_s, model_version, route, arm, user, session, prompt_name, ...)."""
    params = {k: body[k] for k in SAMPLING_FIELDS if k in body}
    user = body.get("user") if isinstance(body.get("user"), str) else None
    row = Interaction(id=fields.pop("id", ""), time=_time.time() if time is None else time, model=model,
                      input=request_input(body), request=dict(body), output=output, params=params,
                      user=fields.pop("user", user), **fields)
    validate_interaction(row)
    return row


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_interaction(row: Interaction, where: str = "interaction") -> None:
    """Check the field types a store relies on; a bad one is an :class:`LmstackError` naming the field."""
    def bad(name: str, want: str) -> LmstackError:
        return FieldError(f"{where}: '{name}' must be {want}, got {getattr(row, name)!r:.60}", name)

    if not isinstance(row.id, str):
        raise bad("id", "a string (empty for a new id)")
    if not _is_num(row.time) or not math.isfinite(row.time):
        raise bad("time", "unix seconds (a finite number)")
    if not isinstance(row.model, str) or not row.model:
        raise bad("model", "the served model's id (a non-empty string)")
    for name in ("model_version", "input", "output", "finish_reason"):
        if not isinstance(getattr(row, name), str):
            raise bad(name, "a string")
    for name in ("prompt_name", "route", "arm", "user", "session"):
        if getattr(row, name) is not None and not isinstance(getattr(row, name), str):
            raise bad(name, "a string or null")
    if row.prompt_version is not None and (not _is_int(row.prompt_version) or abs(row.prompt_version) >= 2 ** 31):
        raise bad("prompt_version", "an integer (below 2**31) or null")
    for name in ("prompt_tokens", "completion_tokens"):
        if not _is_int(getattr(row, name)) or not 0 <= getattr(row, name) < 2 ** 31:
            raise bad(name, "a count (an integer >= 0, below 2**31)")
    if not _is_num(row.latency_s):
        raise bad("latency_s", "seconds (a number)")
    if row.ttft_s is not None and not _is_num(row.ttft_s):
        raise bad("ttft_s", "seconds (a number) or null")
    for name in JSON_FIELDS:
        if not isinstance(getattr(row, name), dict):
            raise bad(name, "a JSON object (a dict)")
        _dumps(getattr(row, name), name)
    if row.embedding is not None and (not isinstance(row.embedding, (list, tuple))
                                      or not all(_is_num(x) for x in row.embedding)):
        raise bad("embedding", "a list of numbers or null")


def validate_feedback(fb: Feedback, where: str = "feedback") -> None:
    """The invariants of each feedback kind (see :class:`Feedback`); a bad field is a :class:`FieldError`."""
    def bad(name: str, why: str) -> FieldError:
        return FieldError(f"{where}: '{name}' {why}", name)

    if not isinstance(fb.interaction_id, str) or not fb.interaction_id:
        raise bad("interaction_id", "must be the id of a logged interaction (a non-empty string)")
    if fb.kind not in FEEDBACK_KINDS:
        raise bad("kind", f"must be one of {list(FEEDBACK_KINDS)}, got {fb.kind!r:.40}")
    if fb.kind == "thumb" and (not _is_num(fb.value) or fb.value not in (1, -1)):
        raise bad("value", f"of a thumb must be 1 (up) or -1 (down), got {fb.value!r:.40}")
    if fb.kind == "comment" and (not isinstance(fb.text, str) or not fb.text.strip()):
        raise bad("text", "of a comment must be a non-empty string")
    if fb.kind == "pairwise":
        if not isinstance(fb.other_id, str) or not fb.other_id:
            raise bad("other_id", "of a pairwise choice must be the other interaction's id")
        if fb.other_id == fb.interaction_id:
            raise bad("other_id", "must differ from 'interaction_id' (two answers are compared)")
        if not _is_num(fb.value) or fb.value not in (1, -1, 0):
            raise bad("value", f"of a pairwise choice must be 1 (interaction_id preferred), -1 (other_id "
                               f"preferred) or 0 (a tie), got {fb.value!r:.40}")
    elif fb.other_id is not None:
        raise bad("other_id", f"belongs to pairwise choices only, not to a {fb.kind}")
    if fb.kind == "comment" and fb.value is not None:
        raise bad("value", "belongs to thumbs and pairwise choices, not to a comment")
    if fb.text is not None and not isinstance(fb.text, str):
        raise bad("text", "must be a string")
    if not _is_num(fb.time) or not math.isfinite(fb.time) or fb.time < 0:
        raise bad("time", "must be unix seconds (0 for now)")
    if fb.user is not None and not isinstance(fb.user, str):
        raise bad("user", "must be a string or null")


class LogStore(Protocol):
    def log(self, row: Interaction) -> str: ...
    def log_many(self, rows: Sequence[Interaction]) -> list[str]: ...
    def get(self, id: str) -> Interaction: ...
    def add_feedback(self, fb: Feedback) -> None: ...
    def feedback(self, interaction_id: str | None = None) -> list[Feedback]: ...
    def rows(self, since: float | None = None, until: float | None = None, model: str | None = None,
             arm: str | None = None, limit: int | None = None) -> list[Interaction]: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------------
# schema: an ordered list of migrations per backend; migration k (1-based) takes the schema to version k.
# Append new ones, never edit an applied one: a store at version k runs only migrations k+1.. at open.

_V1_COLUMNS = """
    "id" TEXT PRIMARY KEY,
    "time" {real} NOT NULL,
    "model" TEXT NOT NULL,
    "model_version" TEXT NOT NULL DEFAULT '',
    "prompt_name" TEXT,
    "prompt_version" INTEGER,
    "route" TEXT,
    "user" TEXT,
    "session" TEXT,
    "input" TEXT NOT NULL DEFAULT '',
    "request" {json} NOT NULL DEFAULT '{{}}',
    "output" TEXT NOT NULL DEFAULT '',
    "finish_reason" TEXT NOT NULL DEFAULT '',
    "prompt_tokens" INTEGER NOT NULL DEFAULT 0,
    "completion_tokens" INTEGER NOT NULL DEFAULT 0,
    "latency_s" {real} NOT NULL DEFAULT 0,
    "ttft_s" {real},
    "params" {json} NOT NULL DEFAULT '{{}}',
    "embedding" {blob},
    "meta" {json} NOT NULL DEFAULT '{{}}'
"""

_FEEDBACK_TABLE = """CREATE TABLE feedback (
    "id" {serial},
    "interaction_id" TEXT NOT NULL REFERENCES interactions("id") ON DELETE CASCADE,
    "kind" TEXT NOT NULL,
    "value" {real},
    "text" TEXT,
    "other_id" TEXT REFERENCES interactions("id") ON DELETE CASCADE,
    "time" {real} NOT NULL,
    "user" TEXT
)"""


def _migrations(real: str, json_: str, blob: str, serial: str) -> list[list[str]]:
    kw = {"real": real, "json": json_, "blob": blob, "serial": serial}
    return [
        # 1: interactions and feedback
        [f"CREATE TABLE interactions ({_V1_COLUMNS.format(**kw)})",
         'CREATE INDEX interactions_time ON interactions ("time")',
         _FEEDBACK_TABLE.format(**kw),
         'CREATE INDEX feedback_interaction ON feedback ("interaction_id")'],
        # 2: A/B arms, and the indexes the per-model, per-arm and pairwise queries use
        ['ALTER TABLE interactions ADD COLUMN "arm" TEXT',
         'CREATE INDEX interactions_model_time ON interactions ("model", "time")',
         'CREATE INDEX interactions_arm_time ON interactions ("arm", "time")',
         'CREATE INDEX feedback_other ON feedback ("other_id")',
         'CREATE INDEX feedback_time ON feedback ("time")'],
    ]


SQLITE_MIGRATIONS = _migrations("REAL", "TEXT", "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT")
POSTGRES_MIGRATIONS = _migrations("DOUBLE PRECISION", "JSONB", "BYTEA", "BIGSERIAL PRIMARY KEY")
SCHEMA_VERSION = len(SQLITE_MIGRATIONS)
assert len(POSTGRES_MIGRATIONS) == SCHEMA_VERSION


def _pack_embedding(v: Sequence[float] | None) -> bytes | None:
    if v is None:
        return None
    a = array("f", v)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _unpack_embedding(b: bytes | memoryview | None) -> list[float] | None:
    if b is None:
        return None
    a = array("f")
    a.frombytes(bytes(b))
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


def _nul_free(obj: Any) -> Any:
    """``obj`` with every NUL character in its strings (keys too) replaced by U+FFFD."""
    if isinstance(obj, str):
        return obj.replace("\x00", "\ufffd")
    if isinstance(obj, dict):
        return {_nul_free(k): _nul_free(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nul_free(v) for v in obj]
    return obj


def _dumps(obj: Any, name: str) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise FieldError(f"interaction: '{name}' must hold JSON values only (no NaN/inf, no objects): {e}",
                         name) from None


def _seconds(older_than: float | timedelta) -> float:
    s = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
    if not _is_num(s) or not math.isfinite(s) or s < 0:
        raise LmstackError(f"prune: 'older_than' must be a duration >= 0 (seconds or a timedelta), got {older_than!r}")
    return float(s)


# ----------------------------------------------------------------------------------------------------
# the SQL both backends share


_INHERITED: list[Any] = []


class _Held:
    """One thread's connection. A server's worker threads come and go (anyio retires idle ones), and a
    thread's locals die with it: this closes the connection then, so a long-running server does not pile up
    connections (file handles; PostgreSQL's max_connections)."""

    def __init__(self, conn: Any):
        self.conn, self.pid = conn, os.getpid()

    def close(self) -> None:
        if self.pid == os.getpid() and self.conn is not None:   # never a parent's, inherited through fork
            conn, self.conn = self.conn, None
            with contextlib.suppress(Exception):
                conn.close()

    def __del__(self) -> None:
        self.close()


class _SQLStore:
    """The queries of both stores; a backend gives connections, transactions, placeholders and decoding."""

    url: str
    dialect: str
    migrations: list[list[str]]
    _ph = "?"            # the backend's placeholder (the SQL below is written with "?")
    _json_ph = "?"       # the placeholder of a JSON column's value

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._held: weakref.WeakSet[_Held] = weakref.WeakSet()
        self._closed = False

    # -- connections (one per thread and per process)

    def _connect(self) -> Any:
        raise NotImplementedError

    def _conn(self) -> Any:
        if self._closed:
            raise LmstackError(f"{self.url}: the store is closed")
        held = getattr(self._local, "held", None)
        if held is not None:
            if held.pid == os.getpid():
                if self._alive(held.conn):
                    return held.conn
                held.close()   # broken (a server restarted, a connection killed): a new one below
            # inherited through fork, the parent's: never used here, and kept referenced, since collecting a
            # PostgreSQL connection would say goodbye on the parent's socket
            _INHERITED.append(held.conn)
        held = _Held(self._connect())
        with self._lock:
            self._held.add(held)
        self._local.held = held
        return held.conn

    def _alive(self, conn: Any) -> bool:
        return True

    def close(self) -> None:
        """Close every connection this process opened (each thread's)."""
        with self._lock:
            mine = list(self._held)
            self._held = weakref.WeakSet()
            self._closed = True
        for held in mine:
            held.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _sql(self, sql: str) -> str:
        return sql if self._ph == "?" else sql.replace("?", self._ph)

    @contextlib.contextmanager
    def _write(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        raise NotImplementedError

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one statement in its own write transaction (migration tests, maintenance)."""
        with self._write() as cur:
            cur.execute(self._sql(sql), params)

    # -- schema

    def _versions_table(self, cur: Any) -> None:
        cur.execute(f'CREATE TABLE IF NOT EXISTS schema_version ("version" INTEGER PRIMARY KEY, '
                    f'"applied" {"REAL" if self.dialect == "sqlite" else "DOUBLE PRECISION"} NOT NULL)')

    def _has_table(self, name: str) -> bool:
        raise NotImplementedError

    def schema_version(self) -> int:
        """The version of the store's schema (0: an empty database)."""
        if not self._has_table("schema_version"):
            return 0
        return int(self._read('SELECT max("version") FROM schema_version')[0][0] or 0)

    def _lock_schema(self, cur: Any) -> None:
        """Serialise migrations between processes (SQLite: BEGIN IMMEDIATE already holds the write lock)."""

    def migrate(self, to: int | None = None) -> int:
        """Apply the missing migrations up to ``to`` (default: the latest) in one transaction; the version."""
        to = SCHEMA_VERSION if to is None else to
        if not 0 <= to <= SCHEMA_VERSION:
            raise LmstackError(f"{self.url}: schema version {to} does not exist (this lmstack knows 1..{SCHEMA_VERSION})")
        if self._current_ok(to):
            return to
        with self._write() as cur:
            self._lock_schema(cur)
            self._versions_table(cur)
            cur.execute('SELECT max("version") FROM schema_version')
            have = int(cur.fetchone()[0] or 0)
            if have > SCHEMA_VERSION:
                raise LmstackError(f"{self.url}: the store has schema version {have}, newer than this lmstack's "
                                   f"{SCHEMA_VERSION}; upgrade lmstack to use it")
            for version in range(have + 1, to + 1):
                for stmt in self.migrations[version - 1]:
                    cur.execute(stmt)
                cur.execute(self._sql('INSERT INTO schema_version ("version", "applied") VALUES (?, ?)'),
                            (version, _time.time()))
            return max(have, to)

    def _current_ok(self, to: int) -> bool:
        have = self.schema_version()
        if have > SCHEMA_VERSION:
            raise LmstackError(f"{self.url}: the store has schema version {have}, newer than this lmstack's "
                               f"{SCHEMA_VERSION}; upgrade lmstack to use it")
        return have >= to

    def open(self) -> Self:
        """Connect and bring the schema to the latest version; returns the store."""
        self.migrate()
        return self

    # -- writing

    def _encode(self, row: Interaction) -> tuple:
        out = []
        for name in FIELDS:
            v = getattr(row, name)
            if name in JSON_FIELDS:
                v = _dumps(v, name)
            elif name == "embedding":
                v = _pack_embedding(v)
            elif name in ("time", "latency_s", "ttft_s") and v is not None:
                v = float(v)
            out.append(v)
        return tuple(out)

    def _insert_sql(self) -> str:
        cols = ", ".join(f'"{c}"' for c in FIELDS)
        vals = ", ".join(self._json_ph if c in JSON_FIELDS else "?" for c in FIELDS)
        return self._sql(f"INSERT INTO interactions ({cols}) VALUES ({vals})")

    def _duplicate(self, e: Exception) -> bool:
        raise NotImplementedError

    def log(self, row: Interaction) -> str:
        """Store one interaction (a new id when ``row.id`` is empty); returns its id."""
        return self.log_many([row])[0]

    def log_many(self, rows: Sequence[Interaction]) -> list[str]:
        """Store interactions in one transaction: all of them or, on any error, none."""
        prepared, ids = [], []
        for k, row in enumerate(rows):
            if not isinstance(row, Interaction):
                raise LmstackError(f"interaction {k}: expected an Interaction, got {type(row).__name__}")
            validate_interaction(row, f"interaction {row.id or k}")
            if not row.id:
                row = dataclasses.replace(row, id=new_interaction_id())
            prepared.append(self._encode(row))
            ids.append(row.id)
        if not prepared:
            return []
        try:
            with self._write() as cur:
                cur.executemany(self._insert_sql(), prepared)
        except Exception as e:
            if self._duplicate(e):
                raise DuplicateInteraction(f"{self.url}: an interaction with one of the ids {ids[:5]} is already "
                                           "logged; leave 'id' empty for a new one") from None
            raise
        return ids

    def add_feedback(self, fb: Feedback) -> None:
        """Store one feedback row; an unknown interaction (or other_id) is an error naming it."""
        if not isinstance(fb, Feedback):
            raise LmstackError(f"feedback: expected a Feedback, got {type(fb).__name__}")
        validate_feedback(fb)
        when = float(fb.time) or _time.time()
        with self._write() as cur:
            ids = [fb.interaction_id] + ([fb.other_id] if fb.other_id else [])
            cur.execute(self._sql(f'SELECT "id", "input" FROM interactions WHERE "id" IN '
                                  f'({", ".join("?" * len(ids))})'), ids)
            found = dict(cur.fetchall())
            for name, i in zip(("interaction_id", "other_id"), ids):
                if i not in found:
                    raise UnknownInteraction(f"feedback: '{name}' {i!r} is not a logged interaction in {self.url}",
                                             name)
            if fb.kind == "pairwise" and found[fb.interaction_id] != found[fb.other_id]:
                raise FieldError(f"feedback: a pairwise choice compares two answers to one prompt; interactions "
                                 f"{fb.interaction_id!r} and {fb.other_id!r} have different inputs", "other_id")
            cur.execute(self._sql('INSERT INTO feedback ("interaction_id", "kind", "value", "text", "other_id", '
                                  '"time", "user") VALUES (?, ?, ?, ?, ?, ?, ?)'),
                        (fb.interaction_id, fb.kind, None if fb.value is None else float(fb.value), fb.text,
                         fb.other_id, when, fb.user))

    def prune(self, older_than: float | timedelta, now: float | None = None) -> int:
        """Delete interactions (and their feedback) older than ``older_than`` (seconds or a timedelta) before
        ``now`` (default: the current time); returns how many interactions went."""
        cutoff = (_time.time() if now is None else now) - _seconds(older_than)
        with self._write() as cur:
            cur.execute(self._sql('DELETE FROM interactions WHERE "time" < ?'), (cutoff,))
            return int(cur.rowcount)

    # -- reading

    def _decode(self, t: tuple) -> Interaction:
        d = dict(zip(FIELDS, t))
        for name in JSON_FIELDS:
            if isinstance(d[name], str):
                d[name] = json.loads(d[name])
        d["embedding"] = _unpack_embedding(d["embedding"])
        return Interaction(**d)

    def _select(self) -> str:
        return "SELECT " + ", ".join(f'"{c}"' for c in FIELDS) + " FROM interactions"

    def get(self, id: str) -> Interaction:
        got = self._read(self._select() + ' WHERE "id" = ?', (id,))
        if not got:
            raise UnknownInteraction(f"interaction {id!r} is not in {self.url}", "id")
        return self._decode(got[0])

    @staticmethod
    def _where(since: float | None, until: float | None, model: str | None, arm: str | None,
               input: str | None = None) -> tuple[list[str], list[Any]]:
        cond, params = [], []
        for sql, v in (('"time" >= ?', since), ('"time" < ?', until), ('"model" = ?', model),
                       ('"arm" = ?', arm), ('"input" = ?', input)):
            if v is not None:
                cond.append(sql)
                params.append(v)
        return cond, params

    def iter_rows(self, since: float | None = None, until: float | None = None, model: str | None = None,
                  arm: str | None = None, input: str | None = None, batch: int = 1000) -> Iterator[Interaction]:
        """Rows with ``since <= time < until`` in (time, id) order, read in batches (for exports of any size)."""
        cond, params = self._where(since, until, model, arm, input)
        last: tuple[float, str] | None = None
        while True:
            c, p = list(cond), list(params)
            if last is not None:
                c.append('("time" > ? OR ("time" = ? AND "id" > ?))')
                p += [last[0], last[0], last[1]]
            where = f" WHERE {' AND '.join(c)}" if c else ""
            got = self._read(f'{self._select()}{where} ORDER BY "time", "id" LIMIT {int(batch)}', p)
            for t in got:
                yield self._decode(t)
            if len(got) < batch:
                return
            last = (got[-1][FIELDS.index("time")], got[-1][0])

    def rows(self, since: float | None = None, until: float | None = None, model: str | None = None,
             arm: str | None = None, limit: int | None = None, input: str | None = None) -> list[Interaction]:
        """Rows with ``since <= time < until`` (and the given model / arm / input) in time order."""
        if limit is not None and (not _is_int(limit) or limit < 0):
            raise LmstackError(f"rows: 'limit' must be an integer >= 0, got {limit!r}")
        out = []
        batch = 1000 if limit is None else max(1, min(limit, 1000))
        for row in self.iter_rows(since, until, model, arm, input, batch=batch):
            if limit is not None and len(out) >= limit:
                break
            out.append(row)
        return out

    def count(self) -> int:
        return int(self._read("SELECT count(*) FROM interactions")[0][0])

    def feedback(self, interaction_id: str | None = None, since: float | None = None) -> list[Feedback]:
        """Feedback in time order: all of it, or that about one interaction (as either side of a pairwise
        choice), or that added at or after ``since``."""
        cond, params = [], []
        if interaction_id is not None:
            cond.append('("interaction_id" = ? OR "other_id" = ?)')
            params += [interaction_id, interaction_id]
        if since is not None:
            cond.append('"time" >= ?')
            params.append(since)
        where = f" WHERE {' AND '.join(cond)}" if cond else ""
        cols = ", ".join(f'"{c}"' for c in FEEDBACK_FIELDS)
        got = self._read(f'SELECT {cols} FROM feedback{where} ORDER BY "time", "id"', params)
        return [Feedback(**dict(zip(FEEDBACK_FIELDS, t))) for t in got]

    def feedback_for(self, ids: Sequence[str]) -> dict[str, list[Feedback]]:
        """The feedback about each of ``ids`` (as either side of a pairwise choice), in time order."""
        out: dict[str, list[Feedback]] = {i: [] for i in ids}
        cols = ", ".join(f'"{c}"' for c in FEEDBACK_FIELDS)
        ids = list(out)
        for k in range(0, len(ids), 500):   # bounded IN lists
            chunk = ids[k:k + 500]
            marks = ", ".join("?" * len(chunk))
            got = self._read(f'SELECT {cols} FROM feedback WHERE "interaction_id" IN ({marks}) OR "other_id" IN '
                             f'({marks}) ORDER BY "time", "id"', chunk + chunk)
            for t in got:
                fb = Feedback(**dict(zip(FEEDBACK_FIELDS, t)))
                for i in {fb.interaction_id, fb.other_id} & set(chunk):
                    out[i].append(fb)
        return out

    def inputs_with_alternatives(self, since: float | None = None, limit: int | None = None) -> list[str]:
        """Inputs answered at least twice with different outputs (the pairwise page's candidates), sorted."""
        cond, params = self._where(since, None, None, None)
        where = f" WHERE {' AND '.join(cond)}" if cond else ""
        lim = f" LIMIT {int(limit)}" if limit is not None else ""
        got = self._read(f'SELECT "input" FROM interactions{where} GROUP BY "input" '
                         f'HAVING count(DISTINCT "output") >= 2 ORDER BY "input"{lim}', params)
        return [t[0] for t in got]

    def sample(self, n: int, seed: int = 0, since: float | None = None, until: float | None = None,
               model: str | None = None, stratify_by: str | None = None,
               without_feedback: bool = False) -> list[Interaction]:
        """``n`` interactions drawn without replacement for review, the same ones for the same ``seed`` and
        store contents. With ``stratify_by`` (a field such as ``"model"`` or ``"arm"``) each value gets an
        equal share (a small stratum gives all it has, the rest is shared among the others); with
        ``without_feedback`` only interactions nobody has judged yet. Returned in time order."""
        if not _is_int(n) or n < 0:
            raise FieldError(f"sample: 'n' must be an integer >= 0, got {n!r}", "n")
        if stratify_by is not None and stratify_by not in STRATA:
            raise FieldError(f"sample: 'stratify_by' must be one of {list(STRATA)}, got {stratify_by!r}",
                             "stratify_by")
        cond, params = self._where(since, until, model, None)
        if without_feedback:
            cond.append('NOT EXISTS (SELECT 1 FROM feedback f WHERE f."interaction_id" = interactions."id" '
                        'OR f."other_id" = interactions."id")')
        where = f" WHERE {' AND '.join(cond)}" if cond else ""
        key = f'"{stratify_by}"' if stratify_by else "NULL"
        # sorted here, not by the database's collation: the same seed draws the same rows from either backend
        got = sorted(self._read(f'SELECT "id", {key} FROM interactions{where}', params), key=lambda t: t[0])
        rng = random.Random(seed)
        strata: dict[Any, list[str]] = {}
        for i, k in got:
            strata.setdefault(k, []).append(i)
        picked: list[str] = []
        groups = [strata[k] for k in sorted(strata, key=lambda k: (k is not None, str(k)))]
        for g in groups:
            rng.shuffle(g)
        # equal shares, round-robin: each stratum in turn gives its next id until n are taken or all run out
        depth = 0
        while len(picked) < n and any(depth < len(g) for g in groups):
            for g in groups:
                if depth < len(g) and len(picked) < n:
                    picked.append(g[depth])
            depth += 1
        rows = [self.get(i) for i in picked]
        return sorted(rows, key=lambda r: (r.time, r.id))

    def stats(self) -> list[dict[str, Any]]:
        """Per model and UTC day: interactions, feedback rows, thumbs up and down, mean latency."""
        day = self._day_sql('i."time"')
        got = self._read(
            f'SELECT i."model", {day} AS day, count(*), avg(i."latency_s"), '
            f'sum((SELECT count(*) FROM feedback f WHERE f."interaction_id" = i."id")), '
            f'sum((SELECT count(*) FROM feedback f WHERE f."interaction_id" = i."id" AND f."kind" = \'thumb\' '
            f'AND f."value" > 0)), '
            f'sum((SELECT count(*) FROM feedback f WHERE f."interaction_id" = i."id" AND f."kind" = \'thumb\' '
            f'AND f."value" < 0)) '
            f'FROM interactions i GROUP BY i."model", day ORDER BY i."model", day')
        return [{"model": m, "day": d, "interactions": int(c), "mean_latency_s": float(lat or 0.0),
                 "feedback": int(fb or 0), "thumbs_up": int(up or 0), "thumbs_down": int(down or 0)}
                for m, d, c, lat, fb, up, down in got]

    def _day_sql(self, col: str) -> str:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------
# SQLite


class SQLiteStore(_SQLStore):
    """The embedded store: one SQLite file in WAL mode (see the module docstring)."""

    dialect = "sqlite"
    migrations = SQLITE_MIGRATIONS
    BUSY_TIMEOUT_S = 60.0   # how long a writer waits for the write lock before giving up

    def __init__(self, path: str | os.PathLike, create: bool = True):
        super().__init__()
        self.path = Path(path)
        self.create = create   # False: a missing file is an error (read-only commands never leave an empty one)
        self.url = f"sqlite://{self.path}"   # sqlite:///abs/path.db or sqlite://relative.db

    def _connect(self) -> sqlite3.Connection:
        if self.path.is_dir():
            raise LmstackError(f"{self.path}: is a folder; give the log store a file path (e.g. {self.path}/log.db)")
        if not self.create and not self.path.exists():
            raise LmstackError(f"{self.path}: no such log store; check the path (a server started with "
                               "--log-store creates it)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; each write opens BEGIN IMMEDIATE itself. One
            # connection serves one thread (the per-thread registry), so it may be closed from another.
            conn = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.DatabaseError as e:
            raise LmstackError(f"{self.path}: cannot open the SQLite log store ({e})") from None
        except OSError as e:
            raise LmstackError(f"{self.path}: cannot create the log store ({e.strerror})") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._wal(conn)
            # NORMAL in WAL mode: a crashed process loses nothing committed; only a power cut may drop the
            # last transactions (never corrupts)
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as e:
            conn.close()
            raise LmstackError(f"{self.path}: cannot open the SQLite log store ({e}); give a new path or an "
                               "lmstack log store file") from None
        return conn

    def _wal(self, conn: sqlite3.Connection) -> None:
        # WAL is persistent, set once per file; switching a new file to it takes an exclusive lock without
        # waiting on the busy handler, so processes opening a fresh store together retry here
        deadline = _time.monotonic() + self.BUSY_TIMEOUT_S
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or _time.monotonic() > deadline:
                    raise
                _time.sleep(0.01)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        conn = self._conn()
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise LmstackError(f"{self.path}: cannot start a write ({e}); another process holds the store's "
                               f"write lock for over {self.BUSY_TIMEOUT_S:.0f} s") from None
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
            raise
        finally:
            cur.close()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        try:
            return self._conn().execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                raise LmstackError(f"{self.path}: not an lmstack log store (open it with open_store)") from None
            raise

    def _has_table(self, name: str) -> bool:
        return bool(self._read("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))

    def _duplicate(self, e: Exception) -> bool:
        return isinstance(e, sqlite3.IntegrityError) and "UNIQUE" in str(e)

    def _day_sql(self, col: str) -> str:
        return f"strftime('%Y-%m-%d', {col}, 'unixepoch')"

    def integrity_check(self) -> str:
        """SQLite's own ``PRAGMA integrity_check`` plus the foreign-key check: ``"ok"`` or the problems."""
        problems = [r[0] for r in self._read("PRAGMA integrity_check") if r[0] != "ok"]
        problems += [f"foreign key: {r}" for r in self._read("PRAGMA foreign_key_check")]
        return "ok" if not problems else "; ".join(problems)


# ----------------------------------------------------------------------------------------------------
# PostgreSQL


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages)."""
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:
        return "postgresql://<unparseable URL>"
    if p.password is None:
        return url
    netloc = f"{p.username or ''}:***@{p.hostname or ''}" + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit(p._replace(netloc=netloc))


class PostgresStore(_SQLStore):
    """The shared store: a PostgreSQL database reached by URL (see the module docstring)."""

    dialect = "postgresql"
    migrations = POSTGRES_MIGRATIONS
    _ph = "%s"
    _json_ph = "?::jsonb"
    CONNECT_TIMEOUT_S = 5
    _LOCK_KEY = 0x6C6D7374   # "lmst": the advisory lock migrations hold

    def __init__(self, url: str):
        super().__init__()
        self.dsn = url
        self.url = redact_url(url)

    def _connect(self) -> Any:
        from lmstack.extras import require

        psycopg = require("psycopg", "a PostgreSQL log store")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.dsn).query)
        kw = {} if "connect_timeout" in query else {"connect_timeout": self.CONNECT_TIMEOUT_S}
        try:
            return psycopg.connect(self.dsn, autocommit=True, **kw)
        except psycopg.Error as e:
            why = " ".join(str(e).split()) or type(e).__name__
            raise LmstackError(f"{self.url}: cannot connect to PostgreSQL ({why[:200]}); start the server or fix "
                               "host, port, user, password or database in the URL") from None

    def _alive(self, conn: Any) -> bool:
        return not (conn.closed or conn.broken)

    def _lost(self, e: Exception) -> LmstackError:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        return LmstackError(f"{self.url}: lost the connection to PostgreSQL ({why}); the next call reconnects")

    @contextlib.contextmanager
    def _write(self) -> Iterator[Any]:
        import psycopg

        conn = self._conn()
        try:
            with conn.transaction(), conn.cursor() as cur:
                yield cur
        except psycopg.OperationalError as e:
            raise self._lost(e) from None

    def _lock_schema(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (self._LOCK_KEY,))

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        import psycopg

        try:
            with self._conn().cursor() as cur:
                cur.execute(self._sql(sql), tuple(params))
                return cur.fetchall()
        except psycopg.errors.UndefinedTable:
            raise LmstackError(f"{self.url}: not an lmstack log store (open it with open_store)") from None
        except psycopg.OperationalError as e:
            raise self._lost(e) from None

    def _has_table(self, name: str) -> bool:
        return self._read("SELECT to_regclass(?)", (name,))[0][0] is not None

    def _encode(self, row: Interaction) -> tuple:
        # PostgreSQL text and jsonb cannot hold NUL characters; they become U+FFFD, the replacement character
        clean = {name: _nul_free(getattr(row, name)) for name in FIELDS if name != "embedding"}
        return super()._encode(dataclasses.replace(row, **clean))

    def _duplicate(self, e: Exception) -> bool:
        import psycopg

        return isinstance(e, psycopg.errors.UniqueViolation)

    def _day_sql(self, col: str) -> str:
        return f"to_char(to_timestamp({col}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


# ----------------------------------------------------------------------------------------------------


def store_for(url: str | os.PathLike, create: bool = True) -> SQLiteStore | PostgresStore:
    """The store a URL names, not yet connected: ``postgresql://...`` (or ``postgres://``), ``sqlite:///abs.db``
    / ``sqlite://rel.db``, or a plain file path (SQLite). ``create=False``: a missing SQLite file is an error."""
    s = os.fspath(url)
    if not isinstance(s, str) or not s.strip():
        raise LmstackError("log store: give a URL (postgresql://user@host/db) or a SQLite file path (log.db)")
    scheme = s.split("://", 1)[0].lower() if "://" in s else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(s)
    if scheme == "sqlite":
        s = s[len("sqlite://"):]
        if not s or s in ("/:memory:", ":memory:"):
            raise LmstackError("log store: an in-memory SQLite store is not shared between threads; give a file "
                               "path, e.g. sqlite:///tmp/log.db")
    elif scheme:
        raise LmstackError(f"log store {redact_url(s)!r}: unknown scheme {scheme!r}; use postgresql://..., "
                           "sqlite:///path.db or a file path")
    return SQLiteStore(s, create=create)


def open_store(url: str | os.PathLike, create: bool = True) -> SQLiteStore | PostgresStore:
    """Open (and create or migrate) the log store at ``url``; see :func:`store_for` for the URL forms.
    ``create=False``: a missing SQLite file is an error instead of a new empty store."""
    store = store_for(url, create)
    try:
        return store.open()
    except BaseException:
        store.close()
        raise


# ----------------------------------------------------------------------------------------------------
# export


def export_jsonl(store: _SQLStore, path: str | os.PathLike, since: float | None = None, until: float | None = None,
                 model: str | None = None, arm: str | None = None, with_feedback: bool = False) -> int:
    """Write the rows (in time order) to ``path`` as JSONL, atomically: one :class:`Interaction` per line,
    every field as JSON (``time`` in unix seconds), the rows the drift readers take. ``with_feedback`` adds
    ``"feedback"``: the list of the row's :class:`Feedback` objects (thumbs, comments, pairwise choices it is
    part of). Returns the row count."""
    from lmstack.runs import atomic_write_jsonl

    def lines() -> Iterator[dict[str, Any]]:
        batch: list[Interaction] = []
        for row in store.iter_rows(since=since, until=until, model=model, arm=arm):
            batch.append(row)
            if len(batch) == 500:
                yield from flush(batch)
                batch = []
        yield from flush(batch)

    def flush(batch: list[Interaction]) -> Iterator[dict[str, Any]]:
        fbs = store.feedback_for([r.id for r in batch]) if with_feedback and batch else {}
        for r in batch:
            d = interaction_to_dict(r)
            if with_feedback:
                d["feedback"] = [dataclasses.asdict(f) for f in fbs[r.id]]
            yield d

    return atomic_write_jsonl(path, lines())
