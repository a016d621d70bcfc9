"""A PostgreSQL server for the log-store tests, and the fixture that runs one suite against both stores.

``$LMSTACK_TEST_PG_URL`` (a server where the URL's role may CREATE DATABASE) is used when set. Otherwise a
throwaway server is started once per session: ``initdb`` into a temporary folder and ``pg_ctl start`` on a
free port of 127.0.0.1, its unix socket in that folder, stopped and removed at session end. Binaries come from
``$LMSTACK_PG_BIN``, ``pg_config --bindir``, Debian's ``/usr/lib/postgresql/<ver>/bin`` or ``$PATH``. As root
(PostgreSQL refuses to run as root) both run as the ``postgres`` user via ``runuser``. Where no server can be
started the PostgreSQL cases skip with the reason. Each test gets a fresh database on the server.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    cands = [os.environ.get("LMSTACK_PG_BIN", "")]
    if shutil.which("pg_config"):
        with_cfg = subprocess.run(["pg_config", "--bindir"], check=False, capture_output=True, text=True)
        cands.append(with_cfg.stdout.strip())
    cands += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    if shutil.which("initdb"):
        cands.append(str(Path(shutil.which("initdb")).parent))
    for c in cands:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A throwaway PostgreSQL cluster in a temporary folder."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="lmstack-pg-"))   # under /tmp: reachable by the postgres user
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        self.user = "postgres" if self.as_root else None

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        if self.as_root:
            shutil.chown(self.root, "postgres")
        got = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        if got.returncode:
            raise RuntimeError(f"initdb failed: {(got.stderr or got.stdout).strip()[-400:]}")
        # fsync off: a client killed mid-write (what the tests do) is unaffected; only an OS crash would be
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                f"-c fsync=off -c max_connections=200 -c shared_buffers=32MB")
        got = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts, "-w", "-t", "60",
                        "start")
        if got.returncode:
            log = (self.root / "log").read_text(errors="replace")[-400:] if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {(got.stderr or got.stdout).strip()[-300:]} {log}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The admin URL of a PostgreSQL server (see the module docstring); skips where none can be had."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip('psycopg is not installed (pip install "lmstack[monitor]"); the PostgreSQL store is untested')
    url = os.environ.get("LMSTACK_TEST_PG_URL")
    if url:
        yield url
        return
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) found: install Debian's postgresql (.ci/run "
                    "does) or set LMSTACK_TEST_PG_URL")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: PostgreSQL will not start as root; set LMSTACK_TEST_PG_URL")
    server = _Server(bindir)
    try:
        url = server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired, LookupError) as e:
        server.stop()
        pytest.skip(f"could not start a throwaway PostgreSQL server: {e}")
    try:
        yield url
    finally:
        server.stop()


def fresh_database(admin_url: str) -> str:
    """A new empty database on the server of ``admin_url``; its URL."""
    import urllib.parse

    import psycopg

    name = f"lmstack_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    p = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(p._replace(path=f"/{name}"))


def drop_database(admin_url: str, url: str) -> None:
    import urllib.parse

    import psycopg

    name = urllib.parse.urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """The URL of a new, empty log store: a SQLite file, then a database of its own on the PostgreSQL server
    (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'log.db'}"
        return
    admin = request.getfixturevalue("pg_server")
    url = fresh_database(admin)
    yield url
    drop_database(admin, url)
