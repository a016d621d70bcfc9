"""A prompt registry: immutable versions with diffs, labels that move, rollback, YAML export/import.

    from lmstack.prompts.registry import open_registry
    reg = open_registry("prompts.sqlite")                 # SQLite (the default store)
    v = reg.add("qa", PromptTemplate(instruction="...", input="{{ question }}"), message="first cut")
    reg.set_label("qa", "production", v.version)
    reg.get("qa@production").template.render(question="...")   # also "qa@3", "qa" (= latest)
    reg.rollback("qa", "production")                      # the label goes back to the version it left
    reg.export("prompts/")                                # one YAML file per prompt, for review in git
    reg.import_files(["prompts/qa.yaml"])

Versions: every :meth:`Registry.add` makes version ``n + 1`` of the prompt, never changing an old one. A
version records the template's fields, author, UTC time, message (why), parent (the version it was based on:
the latest one when it was written) and the unified diff (:mod:`difflib`) of its YAML form against the
parent's. Labels (``production``, ``staging``, any name that is not a number) point at one version each; every
move is appended to the label history (kind ``set`` or ``rollback``). :meth:`Registry.rollback` undoes the
label's last ``set`` that has not been undone already (so rolling back twice goes back two moves), or moves it
to ``to=``; the version it lands on is the exact text that was stored.

Storage sits behind :class:`PromptStore` (a handful of methods). :class:`SQLiteStore` is the one
implementation (stdlib ``sqlite3``): WAL mode, a busy timeout, and every write in a ``BEGIN IMMEDIATE``
transaction, inside which the next version number is read and the row inserted, with ``UNIQUE(name,
version)`` as the last line of defence; concurrent writers (threads or processes) therefore queue and never
lose or duplicate a version. lmstack has no PostgreSQL code to reuse; a ``postgresql://`` URL is refused with
a one-line error (a psycopg store would implement the same methods).

YAML: :meth:`Registry.export` writes ``NAME.yaml`` per prompt with every version, the labels and the label
history, in a fixed key order with multi-line strings as block scalars, so a prompt change reviews as a
readable git diff. :meth:`Registry.import_files` reads them back exactly (a fresh registry exports the same
bytes); importing into a registry that already has the prompt adds the versions and label moves the file has
beyond it, and refuses a file whose history disagrees with the registry's.
"""

from __future__ import annotations

import contextlib
import difflib
import getpass
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from lmstack.errors import DataError, LmstackError
from lmstack.prompts.template import PromptTemplate

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
YAML_FORMAT = 1


@dataclass(frozen=True)
class PromptVersion:
    """One immutable version of a prompt."""

    name: str
    version: int
    fields: dict[str, Any]          # PromptTemplate.fields()
    author: str
    created: str                    # ISO 8601, UTC
    message: str
    parent: int | None
    diff: str = ""                  # unified diff of the YAML form against the parent (or against nothing)

    @property
    def template(self) -> PromptTemplate:
        return PromptTemplate.from_fields(self.fields, name=f"{self.name}@{self.version}")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class LabelMove:
    """One move of a label (the label history is the list of these, oldest first)."""

    name: str
    label: str
    version: int
    previous: int | None            # where the label pointed before (None: it is new)
    kind: str                       # "set" or "rollback"
    author: str
    time: str
    message: str = ""


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_author() -> str:
    with contextlib.suppress(Exception):
        return os.environ.get("LMSTACK_AUTHOR") or getpass.getuser()
    return "unknown"


def check_name(name: str, what: str = "prompt name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise LmstackError(f"{what} {name!r}: use letters, digits, '_', '.', '-' (starting with a letter or digit)")
    return name


def check_label(label: str) -> str:
    check_name(label, "label")
    if label.isdigit() or label == "latest":
        raise LmstackError(f"label {label!r}: a label cannot be a number or 'latest' (those name versions)")
    return label


def fields_yaml(fields: Mapping[str, Any]) -> str:
    """The template's fields as YAML (the text diffs are computed on, and the export's form)."""
    return dump_yaml(dict(fields))


def version_diff(name: str, old: PromptVersion | None, fields: Mapping[str, Any], version: int) -> str:
    a = fields_yaml(old.fields).splitlines(keepends=True) if old else []
    b = fields_yaml(fields).splitlines(keepends=True)
    return "".join(difflib.unified_diff(a, b, f"{name}@{old.version}" if old else "/dev/null", f"{name}@{version}"))


# ---------------------------------------------------------------------------------------------- the store


class PromptStore(Protocol):
    """What a registry needs from storage. Every write is atomic; version numbers never collide."""

    def add_version(self, name: str, fields: dict[str, Any], author: str, message: str,
                    created: str) -> PromptVersion: ...

    def get_version(self, name: str, version: int | None = None) -> PromptVersion | None: ...

    def versions(self, name: str) -> list[PromptVersion]: ...

    def names(self) -> list[str]: ...

    def move_label(self, name: str, label: str, target: int | Callable[[list[LabelMove]], int], kind: str,
                   author: str, message: str, time: str) -> LabelMove: ...

    def label_moves(self, name: str) -> list[LabelMove]: ...

    def merge(self, versions: Sequence[PromptVersion], moves: Sequence[LabelMove]) -> tuple[int, int]: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, fields TEXT NOT NULL, author TEXT NOT NULL,
    created TEXT NOT NULL, message TEXT NOT NULL, parent INTEGER, diff TEXT NOT NULL,
    UNIQUE (name, version));
CREATE TABLE IF NOT EXISTS label_moves (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, label TEXT NOT NULL, version INTEGER NOT NULL,
    previous INTEGER, kind TEXT NOT NULL, author TEXT NOT NULL, time TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS label_moves_name ON label_moves (name, label, seq);
"""


class SQLiteStore:
    """Prompts in one SQLite file (WAL; writes in ``BEGIN IMMEDIATE`` transactions; see the module docstring).
    The file is opened on first use, so constructing a store touches nothing."""

    def __init__(self, path: str | os.PathLike, busy_timeout_s: float = 30.0, create: bool = True):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.create = create     # False: a missing file is an error (read commands never leave an empty one)
        # one connection per (process, thread): sqlite3 connections may not cross threads, and a forked child
        # must not reuse its parent's
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is not None and self._local.pid == os.getpid():
            return con
        if self.path.is_dir():
            raise LmstackError(f"prompt registry {self.path}: is a folder; give a file path such as prompts.sqlite")
        if not self.create and not self.path.exists():
            raise LmstackError(f"prompt registry {self.path}: no such file; add a prompt first (lmstack prompt add "
                               f"NAME ...) or point --db / $LMSTACK_PROMPT_DB at the registry")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; we open them ourselves with BEGIN IMMEDIATE
        con = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                con.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                con.execute("PRAGMA journal_mode = WAL")
                con.execute("PRAGMA synchronous = NORMAL")   # WAL + NORMAL: durable at checkpoints, never corrupt
                with self._begin(con):
                    for statement in SCHEMA.split(";"):   # not executescript: it would commit our transaction
                        if statement.strip():
                            con.execute(statement)
                break
            except sqlite3.OperationalError as e:
                # switching a new file to WAL takes an exclusive lock without waiting on the busy handler:
                # two processes opening a fresh registry at once retry here
                if "locked" not in str(e) or time.monotonic() > deadline:
                    con.close()
                    raise LmstackError(f"prompt registry {self.path}: {e}") from None
                time.sleep(0.01)
            except sqlite3.DatabaseError as e:
                con.close()
                raise LmstackError(f"prompt registry {self.path}: not a usable SQLite database ({e})") from None
        self._local.con, self._local.pid = con, os.getpid()
        return con

    @contextlib.contextmanager
    def _begin(self, con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        try:
            con.execute("BEGIN IMMEDIATE")   # take the write lock now: read-then-insert cannot interleave
        except sqlite3.OperationalError as e:
            raise LmstackError(f"prompt registry {self.path}: {e} (another writer held it for more than "
                               f"{self.busy_timeout_s:g} s)") from None
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._begin(self._connection()) as con:
            yield con

    def close(self) -> None:
        """Close this thread's connection (others close when their thread's store is collected)."""
        con = getattr(self._local, "con", None)
        if con is not None and self._local.pid == os.getpid():
            con.close()
        self._local.con = None

    # -- reads
    @staticmethod
    def _version(row: Sequence[Any]) -> PromptVersion:
        name, version, fields, author, created, message, parent, diff = row
        return PromptVersion(name, version, json.loads(fields), author, created, message, parent, diff)

    _COLUMNS = "name, version, fields, author, created, message, parent, diff"

    def get_version(self, name: str, version: int | None = None) -> PromptVersion | None:
        con = self._connection()
        if version is None:
            row = con.execute(f"SELECT {self._COLUMNS} FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1",
                              (name,)).fetchone()
        else:
            row = con.execute(f"SELECT {self._COLUMNS} FROM versions WHERE name = ? AND version = ?",
                              (name, version)).fetchone()
        return self._version(row) if row else None

    def versions(self, name: str) -> list[PromptVersion]:
        rows = self._connection().execute(f"SELECT {self._COLUMNS} FROM versions WHERE name = ? ORDER BY version",
                                          (name,)).fetchall()
        return [self._version(r) for r in rows]

    def names(self) -> list[str]:
        return [r[0] for r in self._connection().execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    def label_moves(self, name: str) -> list[LabelMove]:
        return self._moves(self._connection(), name)

    @staticmethod
    def _moves(con: sqlite3.Connection, name: str) -> list[LabelMove]:
        rows = con.execute("SELECT name, label, version, previous, kind, author, time, message FROM label_moves "
                           "WHERE name = ? ORDER BY seq", (name,)).fetchall()
        return [LabelMove(*r) for r in rows]

    # -- writes
    def _insert(self, con: sqlite3.Connection, v: PromptVersion) -> None:
        con.execute(f"INSERT INTO versions ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (v.name, v.version, json.dumps(v.fields, ensure_ascii=False), v.author, v.created, v.message,
                     v.parent, v.diff))

    def add_version(self, name: str, fields: dict[str, Any], author: str, message: str,
                    created: str) -> PromptVersion:
        with self._write() as con:
            row = con.execute(f"SELECT {self._COLUMNS} FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1",
                              (name,)).fetchone()
            parent = self._version(row) if row else None
            number = parent.version + 1 if parent else 1
            v = PromptVersion(name, number, fields, author, created, message, parent.version if parent else None,
                              version_diff(name, parent, fields, number))
            self._insert(con, v)
        return v

    def move_label(self, name: str, label: str, target: int | Callable[[list[LabelMove]], int], kind: str,
                   author: str, message: str, time: str) -> LabelMove:
        with self._write() as con:
            history = [m for m in self._moves(con, name) if m.label == label]
            version = target(history) if callable(target) else target
            if con.execute("SELECT 1 FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone() is None:
                raise LmstackError(f"prompt {name!r} has no version {version}")
            move = LabelMove(name, label, version, history[-1].version if history else None, kind, author, time,
                             message)
            self._append_move(con, move)
        return move

    @staticmethod
    def _append_move(con: sqlite3.Connection, m: LabelMove) -> None:
        con.execute("INSERT INTO label_moves (name, label, version, previous, kind, author, time, message) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (m.name, m.label, m.version, m.previous, m.kind, m.author, m.time, m.message))

    def merge(self, versions: Sequence[PromptVersion], moves: Sequence[LabelMove]) -> tuple[int, int]:
        """Add the versions and label moves of one prompt that the store lacks; (versions, moves) added.
        A version or move the store has that differs from the given one is a conflict (nothing is written)."""
        if not versions:
            return 0, 0
        name = versions[0].name
        with self._write() as con:
            have = {v.version: v for v in (self._version(r) for r in con.execute(
                f"SELECT {self._COLUMNS} FROM versions WHERE name = ?", (name,)))}
            added = 0
            for v in versions:
                old = have.get(v.version)
                if old is None:
                    self._insert(con, v)
                    added += 1
                elif old != v:
                    raise LmstackError(f"import {name!r}: version {v.version} differs from the registry's "
                                       f"(written by {old.author} at {old.created}); export the registry and "
                                       f"reconcile the two histories")
            old_moves = self._moves(con, name)
            common = min(len(old_moves), len(moves))
            if list(moves[:common]) != old_moves[:common]:
                raise LmstackError(f"import {name!r}: the label history differs from the registry's; export "
                                   f"the registry and reconcile the two histories")
            for m in moves[common:]:
                self._append_move(con, m)
        return added, max(0, len(moves) - common)


def open_registry(url: str | os.PathLike | None = None, create: bool = True) -> Registry:
    """A registry: a path or ``sqlite:///path`` (default ``$LMSTACK_PROMPT_DB``, else ``prompts.sqlite``).
    ``create=False``: the file must exist (for reads)."""
    url = str(url if url is not None else os.environ.get("LMSTACK_PROMPT_DB", "prompts.sqlite"))
    if url.startswith(("postgresql://", "postgres://")):
        raise LmstackError(f"{url.split('@')[-1]}: PostgreSQL prompt storage is not implemented; use a SQLite "
                           f"file path (the registry's PromptStore interface is where one would go)")
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///"):]
    elif "://" in url:
        raise LmstackError(f"prompt registry {url!r}: unknown URL scheme; give a SQLite file path")
    return Registry(SQLiteStore(url, create=create))


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Ref:
    """A parsed reference: ``name``, ``name@3``, ``name@label``."""

    name: str
    version: int | None = None
    label: str | None = None

    def __str__(self) -> str:
        return self.name + (f"@{self.version}" if self.version is not None else f"@{self.label}" if self.label else "")


def parse_ref(ref: str) -> Ref:
    if not isinstance(ref, str) or not ref:
        raise LmstackError(f"prompt reference {ref!r}: expected NAME, NAME@VERSION or NAME@LABEL")
    name, at, tag = ref.partition("@")
    check_name(name)
    if at and not tag:
        raise LmstackError(f"prompt reference {ref!r}: nothing after '@'; give a version number or a label")
    if not tag or tag == "latest":
        return Ref(name)
    if tag.isdigit():
        if int(tag) < 1:
            raise LmstackError(f"prompt reference {ref!r}: versions start at 1")
        return Ref(name, version=int(tag))
    return Ref(name, label=check_label(tag))


@dataclass
class Registry:
    """Prompts, their versions and labels, over a :class:`PromptStore`."""

    store: PromptStore

    # -- versions
    def add(self, name: str, template: PromptTemplate | Mapping[str, Any], *, author: str | None = None,
            message: str = "", label: str | None = None, allow_unchanged: bool = False) -> PromptVersion:
        """A new version of ``name`` (version 1 when the prompt is new); ``label`` is then moved to it."""
        check_name(name)
        if label is not None:
            check_label(label)
        tpl = template if isinstance(template, PromptTemplate) else PromptTemplate.from_fields(template, name=name)
        tpl.variables()   # a template that does not compile is never stored
        fields = tpl.fields()
        if not allow_unchanged:
            latest = self.store.get_version(name)
            if latest is not None and latest.fields == fields:
                raise LmstackError(f"prompt {name!r}: the template equals version {latest.version}; nothing to add")
        v = self.store.add_version(name, fields, author or default_author(), message, now_utc())
        if label is not None:
            self.set_label(name, label, v.version, author=author, message=message)
        return v

    def _need(self, name: str) -> None:
        if self.store.get_version(name) is None:
            known = self.store.names()
            raise LmstackError(f"no prompt named {name!r} in the registry"
                               + (f"; it has {', '.join(known[:10])}" + (" ..." if len(known) > 10 else "")
                                  if known else " (it is empty; add one with `lmstack prompt add`)"))

    def get(self, ref: str | Ref) -> PromptVersion:
        """The version a reference names: ``name`` (latest), ``name@3``, ``name@label``."""
        r = parse_ref(ref) if isinstance(ref, str) else ref
        self._need(r.name)
        if r.label is not None:
            labels = self.labels(r.name)
            if r.label not in labels:
                raise LmstackError(f"prompt {r.name!r} has no label {r.label!r}; its labels: "
                                   f"{', '.join(sorted(labels)) or '(none)'}")
            version = labels[r.label]
        else:
            version = r.version
        v = self.store.get_version(r.name, version)
        if v is None:
            latest = self.store.get_version(r.name)
            raise LmstackError(f"prompt {r.name!r} has no version {version}; its versions are 1..{latest.version}")
        return v

    def template(self, ref: str) -> PromptTemplate:
        return self.get(ref).template

    def log(self, name: str) -> list[PromptVersion]:
        check_name(name)
        self._need(name)
        return self.store.versions(name)

    def names(self) -> list[str]:
        return self.store.names()

    def diff(self, a: str, b: str | None = None) -> str:
        """The unified diff from ``a`` to ``b``; with one reference, that version against its parent."""
        va = self.get(a)
        if b is None:
            return va.diff
        vb = self.get(b)
        old = fields_yaml(va.fields).splitlines(keepends=True)
        new = fields_yaml(vb.fields).splitlines(keepends=True)
        return "".join(difflib.unified_diff(old, new, va.ref, vb.ref))

    # -- labels
    def labels(self, name: str) -> dict[str, int]:
        """Each label's current version."""
        out: dict[str, int] = {}
        for m in self.store.label_moves(name):
            out[m.label] = m.version
        return dict(sorted(out.items()))

    def label_history(self, name: str, label: str | None = None) -> list[LabelMove]:
        self._need(name)
        return [m for m in self.store.label_moves(name) if label is None or m.label == label]

    def set_label(self, name: str, label: str, version: int, *, author: str | None = None,
                  message: str = "") -> LabelMove:
        """Point ``label`` at ``version`` (the label is created when new)."""
        check_label(label)
        self._need(name)
        return self.store.move_label(name, label, int(version), "set", author or default_author(), message,
                                     now_utc())

    def rollback(self, name: str, label: str, to: int | None = None, *, author: str | None = None,
                 message: str = "") -> LabelMove:
        """Move ``label`` back: to ``to``, or undo its last ``set`` not undone yet."""
        check_label(label)
        self._need(name)

        def target(history: list[LabelMove]) -> int:
            if not history:
                raise LmstackError(f"prompt {name!r} has no label {label!r}; nothing to roll back")
            if to is not None:
                return to
            undone = 0
            for m in reversed(history):
                if m.kind == "rollback":
                    undone += 1
                elif undone:
                    undone -= 1
                elif m.previous is None:
                    break
                else:
                    return m.previous
            raise LmstackError(f"prompt {name!r} label {label!r}: no earlier version to roll back to "
                               f"(give one with --to)")

        return self.store.move_label(name, label, target, "rollback", author or default_author(), message, now_utc())

    # -- YAML
    def to_record(self, name: str) -> dict[str, Any]:
        """One prompt as plain data: every version, the labels and the label history (export's content)."""
        self._need(name)
        versions = self.store.versions(name)
        return {
            "format": YAML_FORMAT,
            "name": name,
            "labels": self.labels(name),
            "versions": [{"version": v.version, "parent": v.parent, "author": v.author, "created": v.created,
                          "message": v.message, "template": v.fields} for v in versions],
            "label_history": [{"label": m.label, "version": m.version, "previous": m.previous, "kind": m.kind,
                               "author": m.author, "time": m.time, "message": m.message}
                              for m in self.store.label_moves(name)],
        }

    def export(self, folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
        """Write ``folder/NAME.yaml`` for each prompt (atomically); the paths written."""
        from lmstack.runs import atomic_write_text

        out = []
        for name in (list(names) if names is not None else self.store.names()):
            path = Path(folder) / f"{check_name(name)}.yaml"
            out.append(atomic_write_text(path, dump_yaml(self.to_record(name))))
        return out

    def import_files(self, paths: Iterable[str | os.PathLike]) -> dict[str, tuple[int, int]]:
        """Read exported YAML files (or folders of them); per prompt, (versions, label moves) added."""
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                found = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml"))
                if not found:
                    raise DataError(f"{p}: no .yaml files to import")
                files += found
            elif p.is_file():
                files.append(p)
            else:
                raise DataError(f"{p}: no such file or folder")
        records = [(f, record_from_yaml(f)) for f in files]   # every file checked before anything is written
        return {rec[0][0].name: self.store.merge(*rec) for _, rec in records}


def _str_block(dumper: Any, data: str) -> Any:
    # multi-line text as a block scalar (readable diffs); PyYAML falls back to a quoted style by itself where
    # a block cannot hold the string exactly (trailing spaces, some control characters)
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


def dump_yaml(data: Any) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(str, _str_block)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=10 ** 6,
                     default_flow_style=False)


def _get(row: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def record_from_yaml(path: Path) -> tuple[list[PromptVersion], list[LabelMove]]:
    """Versions and label moves from an exported file, checked (a bad field is a DataError naming it)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(f"{path}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping with name, versions, label_history")
    if data.get("format", YAML_FORMAT) != YAML_FORMAT:
        raise DataError(f"{path}: format {data.get('format')!r} is not {YAML_FORMAT}")
    name = check_name(_get(data, "name", str, str(path)))
    versions, moves = [], []
    rows = _get(data, "versions", list, str(path))
    if not rows:
        raise DataError(f"{path}: no versions")
    for k, row in enumerate(rows):
        where = f"{path}: versions[{k}]"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a mapping")
        number = _get(row, "version", int, where)
        if number != k + 1:
            raise DataError(f"{where}: version {number}, expected {k + 1} (versions are numbered 1, 2, ...)")
        parent = row.get("parent")
        if parent is not None and (not isinstance(parent, int) or not 1 <= parent < number):
            raise DataError(f"{where}: parent {parent!r} is not an earlier version")
        fields = PromptTemplate.from_fields(_get(row, "template", dict, where), name=f"{name}@{number}").fields()
        base = versions[parent - 1] if parent else None
        versions.append(PromptVersion(name, number, fields, _get(row, "author", str, where),
                                      _get(row, "created", str, where), _get(row, "message", str, where), parent,
                                      version_diff(name, base, fields, number)))
    for k, row in enumerate(data.get("label_history") or []):
        where = f"{path}: label_history[{k}]"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a mapping")
        version = _get(row, "version", int, where)
        if not 1 <= version <= len(versions):
            raise DataError(f"{where}: version {version} is not in the file")
        kind = _get(row, "kind", str, where)
        if kind not in ("set", "rollback"):
            raise DataError(f"{where}: kind {kind!r} is not 'set' or 'rollback'")
        moves.append(LabelMove(name, check_label(_get(row, "label", str, where)), version, row.get("previous"),
                               kind, _get(row, "author", str, where), _get(row, "time", str, where),
                               _get(row, "message", str, where)))
    derived: dict[str, int] = {}
    for m in moves:
        derived[m.label] = m.version
    if "labels" in data and data["labels"] != dict(sorted(derived.items())):
        raise DataError(f"{path}: 'labels' {data['labels']!r} disagree with the label history, which ends at "
                        f"{dict(sorted(derived.items()))!r}; edit the label history, not 'labels'")
    return versions, moves
