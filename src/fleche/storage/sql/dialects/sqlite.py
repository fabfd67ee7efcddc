"""SQLite: a file on a local disk, in WAL mode, for the processes of one host."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import URL

from ....errors import DatabaseError, NetworkFilesystemWarning
from ...filesystems import filesystem_type, is_network_filesystem
from ...locks import hold
from ..statements import Compiled, raw_cursor
from .base import SIMPLE_KEY, Dialect, on_conflict_upsert

__all__ = ["BUSY_TIMEOUT_S", "SqliteDialect", "filesystem_type", "is_network_filesystem"]

BUSY_TIMEOUT_S = 30.0
"""How long a SQLite connection waits for another process's write lock before failing."""

def _writable(path: Path) -> bool:
    """Whether this process may change the database ``path`` and create files next to it (its
    journal, its lock files): ``False`` on a read-only mount or without write permission."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)


def _open_read_only(path: str) -> sqlite3.Connection:
    """A read-only connection to ``path``: ``mode=ro``, or ``immutable=1`` where SQLite cannot
    open a WAL database read-only otherwise (no ``-shm`` file, and none can be created)."""
    uri = "file:" + urllib.parse.quote(path)
    conn = sqlite3.connect(
        f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False
    )
    try:
        conn.execute("PRAGMA schema_version").fetchall()  # SQLite opens the file on first use
        return conn
    except sqlite3.OperationalError as e:
        conn.close()
        if (getattr(e, "sqlite_errorcode", 0) & 0xFF) != sqlite3.SQLITE_CANTOPEN:
            raise
    return sqlite3.connect(
        f"{uri}?mode=ro&immutable=1", uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False
    )


class SqliteDialect(Dialect):
    """SQLite through the standard library's ``sqlite3``.

    Writes run in ``BEGIN IMMEDIATE`` transactions, which take the database's write lock at once
    (waiting up to :data:`BUSY_TIMEOUT_S`) and hold it for the write only; reads run in deferred
    ones, each one WAL snapshot. Key locks are lock files in ``<database>-locks/`` next to the
    database (:mod:`fleche.storage.locks`), outside the database, so a key held for a long
    ``locked`` section keeps no other writer waiting.

    A database this process cannot write (a read-only mount, no write permission) is opened
    read-only (``mode=ro``; ``immutable=1`` for a WAL database whose ``-shm`` file is missing and
    cannot be made, which assumes nothing changes the file meanwhile); writes then fail at once
    with an error naming the file, and ``locked`` excludes this process's threads only.
    """

    names = ("sqlite",)
    locks_with_connection = False

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        database = url.database
        self.path = (
            Path(database)
            if database and database != ":memory:" and not database.startswith("file:")
            else None
        )
        """The database file, or ``None`` for an in-memory database or a ``file:`` URI."""
        self.read_only = self.path is not None and self.path.exists() and not _writable(self.path)
        """Whether the database is opened read-only (see the class docstring)."""
        self.lock_directory = (
            None if self.path is None or self.read_only else f"{self.path}-locks"
        )
        """Where the key lock files are; ``None`` where only this process's threads can write."""
        self.own_read_connections = self.path is not None  # each memory connection: its own

    def check_writable(self, what: str) -> None:
        if self.read_only:
            assert self.path is not None
            problem = (
                "it is on a read-only filesystem"
                if os.statvfs(self.path).f_flag & os.ST_RDONLY
                else "this process has no permission to write it or its directory"
            )
            raise DatabaseError(str(self.path), f"cannot {what}: {problem} (opened read-only)")

    def create_engine(self, echo: bool) -> sa.Engine:
        on_disk = self.path is not None
        database = str(self.path)
        journal = "WAL"
        if self.read_only:
            engine = sa.create_engine(
                "sqlite+pysqlite://", echo=echo, creator=lambda: _open_read_only(database)
            )
            self._listen(engine, journal=None)
            return engine
        if on_disk:
            fstype = filesystem_type(Path(database).parent)
            if is_network_filesystem(fstype):
                journal = "DELETE"
                warnings.warn(
                    f"the SQLite database {database} is on a network filesystem ({fstype}): WAL "
                    "mode does not work there, so fleche uses a rollback journal, and whether "
                    "several hosts can share the file safely depends on that filesystem's "
                    "locking. To share calls across hosts, use a PostgreSQL or MariaDB URL "
                    "instead.",
                    NetworkFilesystemWarning,
                    stacklevel=6,
                )
        engine = sa.create_engine(self.url, echo=echo, connect_args={"timeout": BUSY_TIMEOUT_S})
        self._listen(engine, journal=journal if on_disk else None)
        return engine

    def _listen(self, engine: sa.Engine, journal: str | None) -> None:
        """Set up each new connection (``journal``: the journal mode to set, if any) and issue
        each transaction's BEGIN ourselves."""

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, record: Any) -> None:
            # Let us issue BEGIN ourselves (below) instead of the driver's implicit one.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            if journal is not None:
                cursor.execute(f"PRAGMA journal_mode={journal}")
                if journal == "WAL":
                    # WAL's recommended setting: commits survive a crash of any process and the
                    # file is never corrupted; only a power cut may lose the last commits. This
                    # matches the file storages' default (durable=False) and saves an fsync.
                    cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        begin = {
            immediate: Compiled(sa.text("BEGIN IMMEDIATE" if immediate else "BEGIN"), engine.dialect)
            for immediate in (False, True)
        }

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # A write takes the write lock at BEGIN, waiting up to the busy timeout; a deferred
            # BEGIN that upgrades later could fail at once with SQLITE_BUSY instead. Run on the
            # bare connection: this is on the path of every write and every snapshot.
            immediate = conn.get_execution_options().get("fleche_immediate", False)
            with raw_cursor(conn) as cursor:
                begin[immediate].execute(cursor, {})

    def snapshot(self, engine: sa.Engine) -> Any:
        return engine  # a deferred BEGIN: one WAL read snapshot

    def writer(self, engine: sa.Engine) -> Any:
        return engine.execution_options(fleche_immediate=True)

    def upsert(self) -> Any:
        return on_conflict_upsert(sqlite.insert)

    def json_text(self, data: Any, entry: str) -> Any | None:
        if SIMPLE_KEY.fullmatch(entry) is None or sqlite3.sqlite_version_info < (3, 38):
            return None
        return data.op("->", return_type=sa.Text)(sa.literal(f'$."{entry}"'))

    def schema_lock(self, conn: sa.Connection) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the BEGIN IMMEDIATE of the transaction excludes others

    def is_transient(self, error: exc.DBAPIError) -> bool:
        orig = error.orig
        if not isinstance(orig, sqlite3.Error):
            return False
        code = getattr(orig, "sqlite_errorcode", 0) & 0xFF
        return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

    def volume(self, conn: sa.Connection) -> int | None:
        """Bytes of the database file and its ``-wal`` and ``-shm`` files (what ``du``
        counts); ``None`` for an in-memory database."""
        if self.path is None:
            return None
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total

    def key_lock_location(self, key: str) -> str:
        return f"lock files in {self.lock_directory}"

    def hold_key(
        self, conn: sa.Connection | None, key: str, timeout: float | None, *, section: bool
    ) -> contextlib.AbstractContextManager[None]:
        if self.lock_directory is None:
            return contextlib.nullcontext()  # nobody else can write: nothing to exclude
        return hold(self.lock_directory, key, timeout=timeout)
