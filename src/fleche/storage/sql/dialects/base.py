"""What a database must provide for ``Sql``: the one class each supported database implements.

Everything that differs between SQLite, PostgreSQL and MariaDB/MySQL lives behind
:class:`Dialect`: how engines are made and which isolation each kind of transaction runs in,
the upsert of a calls row, how writers lock a key, how a JSON entry is read in SQL, how table
creation is serialized and which errors are worth retrying. Supporting another database is one
module with one subclass, registered in :mod:`fleche.storage.sql.dialects`.
"""

from __future__ import annotations

import abc
import contextlib
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import URL

from ..schema import calls

__all__ = [
    "BINARY_RESULTS",
    "SIMPLE_KEY",
    "UPDATED_COLUMNS",
    "Dialect",
    "ServerDialect",
    "lock_id",
    "lock_name",
    "on_conflict_upsert",
]

SIMPLE_KEY = re.compile(r"[A-Za-z0-9_.\-]+")
"""Metadata entry names that need no quoting in a SQLite or MySQL JSON path."""

BINARY_RESULTS = "fleche_binary_results"
"""Execution option (``stmt.execution_options(**{BINARY_RESULTS: True})``) asking for a
statement's rows in the driver's binary format, where a large ``bytea``/``BLOB`` comes as its
bytes rather than as text to decode (PostgreSQL's hex). A dialect whose engine honours it says
so in its ``create_engine``; on the others the rows are already bytes and it changes nothing."""

UPDATED_COLUMNS = tuple(c.name for c in calls.columns if c.name != "key")
"""The columns an upsert replaces in an existing calls row."""


def on_conflict_upsert(insert: Any) -> Any:
    """The upsert of a calls row for databases with ``INSERT ... ON CONFLICT DO UPDATE``, from
    their dialect's ``insert`` construct."""
    stmt = insert(calls)
    return stmt.on_conflict_do_update(
        index_elements=[calls.c.key], set_={name: stmt.excluded[name] for name in UPDATED_COLUMNS}
    )


def lock_id(key: str) -> int:
    """A 60-bit number for ``key``'s database lock: two keys share a lock only if their first
    15 hex digits agree, which merely serializes them."""
    return int(key[:15], 16)


def lock_name(key: str) -> str:
    """A lock name for ``key`` short enough for every database (MySQL allows 64 characters)."""
    return "fleche:" + key[:56]


class Dialect(abc.ABC):
    """One database's way of doing what ``Sql`` needs; an instance serves one database URL.

    Instances are made per process, with the engine; they hold no connections themselves and are
    safe to use from every thread.
    """

    names: ClassVar[tuple[str, ...]]
    """The SQLAlchemy dialect names (``engine.dialect.name``) this class serves."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self.safe_url = url.render_as_string(hide_password=True)

    # -- engines and isolation ------------------------------------------------------------------

    @abc.abstractmethod
    def create_engine(self, echo: bool) -> sa.Engine:
        """A new engine for this database (one per process)."""

    @abc.abstractmethod
    def snapshot(self, engine: sa.Engine) -> Any:
        """Where read transactions of several statements run, so they read one snapshot."""

    @abc.abstractmethod
    def writer(self, engine: sa.Engine) -> Any:
        """Where write transactions run, so each statement sees what earlier writers committed."""

    # -- statements -----------------------------------------------------------------------------

    @abc.abstractmethod
    def upsert(self) -> Any:
        """Insert a ``fleche_calls`` row from parameters named as its columns, or replace every
        column of the row with that key."""

    @abc.abstractmethod
    def json_text(self, data: Any, entry: str) -> Any | None:
        """SQL giving the JSON text of entry ``entry`` of the JSON object in column ``data``
        exactly as stored, or ``None`` where this database cannot name ``entry`` safely."""

    # -- schema ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def schema_lock(self, conn: sa.Connection) -> contextlib.AbstractContextManager[None]:
        """Serialize table creation and migration between processes, within ``conn``'s
        transaction."""

    # -- errors ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def is_transient(self, error: exc.DBAPIError) -> bool:
        """Whether running the transaction again may succeed (deadlock, serialization failure,
        a busy database), beyond a lost connection or a racing insert, which always are."""

    # -- key locks ------------------------------------------------------------------------------

    @abc.abstractmethod
    def hold_key(
        self, conn: sa.Connection | None, key: str, timeout: float | None, *, section: bool
    ) -> contextlib.AbstractContextManager[None]:
        """Hold ``key``'s lock against writers of every process while inside.

        Waits at most ``timeout`` seconds (``None``: without limit) and raises
        :class:`~fleche.errors.LockTimeout` holding nothing. ``conn`` is the connection whose
        transaction the lock is taken in for databases whose locks belong to a connection
        (:attr:`locks_with_connection`); it is left, and the lock released, after that
        transaction ended. With ``section`` the lock is held until leaving, across transactions
        (a ``locked`` section); without, a database may release it with the transaction (one
        write). Other databases get ``None`` and are entered before the transaction begins.
        """

    locks_with_connection: ClassVar[bool] = True
    """Whether :meth:`hold_key` takes its lock on a connection (database servers) rather than
    outside the database (SQLite's lock files)."""

    binds_buffers: bool = True
    """Whether the driver takes a ``memoryview`` as a binary parameter (so a value's chunks go
    to it without a copy); PyMySQL does not (it would write the view's ``repr``)."""

    own_read_connections: bool = True
    """Whether single-statement reads run on autocommit connections of their own, opened like
    the engine's (:mod:`fleche.storage.sql.readers`), rather than on connections of the engine's
    pool: true unless a new connection would see another database (SQLite in memory)."""

    def check_writable(self, what: str) -> None:
        """Raise :class:`~fleche.errors.DatabaseError` saying why, if this process cannot write
        the database (``what``: the operation refused, e.g. "save"); by default it can."""

    def volume(self, conn: sa.Connection) -> int | None:
        """Bytes the fleche tables take in this database, or ``None`` where it cannot say;
        by default it cannot."""
        return None

    def key_lock_name(self, key: str) -> str:
        """The name of ``key``'s lock in the database; by default :func:`lock_name`."""
        return lock_name(key)

    def key_lock_location(self, key: str) -> str:
        """Where ``key``'s lock lives, for error messages."""
        return f"{self.safe_url} lock {self.key_lock_name(key)!r}"

    @contextlib.contextmanager
    def _released_on_exit(self, conn: sa.Connection, release: Any, params: Any) -> Iterator[None]:
        """Run ``release`` on ``conn`` on leaving; a connection that cannot is closed, which
        drops every lock it holds."""
        try:
            yield
        finally:
            if not conn.invalidated:
                try:
                    conn.execute(release, params)
                    conn.rollback()
                except exc.DBAPIError:
                    conn.invalidate()


class ServerDialect(Dialect):
    """A database server (PostgreSQL, MariaDB/MySQL): engines whose connections run in READ
    COMMITTED, so each statement of a replacing save sees what the previous writer committed;
    reads of several statements switch to REPEATABLE READ for one snapshot.

    Engines pre-ping pooled connections: a transaction cannot be run again by the code that
    opened it, so a connection lost since its last use is replaced before one begins (a round
    trip per transaction). Single-key reads skip the pool (:mod:`fleche.storage.sql.readers`)
    and retry on the error instead."""

    def snapshot(self, engine: sa.Engine) -> Any:
        return engine.execution_options(isolation_level="REPEATABLE READ")

    def writer(self, engine: sa.Engine) -> Any:
        return engine
