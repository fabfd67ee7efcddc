"""MariaDB and MySQL through PyMySQL: a server that every host of a cluster can share."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import mysql

from ....errors import DatabaseError, LockTimeout
from ..schema import calls
from .base import SIMPLE_KEY, UPDATED_COLUMNS, ServerDialect

__all__ = ["MysqlDialect"]

_YEAR_S = 365 * 24 * 3600
"""How long ``GET_LOCK`` waits without a ``lock_timeout``: MariaDB has no infinite wait."""
_NAME = sa.bindparam("name", type_=sa.String)
_GET_LOCK = sa.select(sa.func.get_lock(_NAME, sa.bindparam("timeout", type_=sa.Float)))
_RELEASE_LOCK = sa.select(sa.func.release_lock(_NAME))


_VOLUME = sa.text(
    "SELECT SUM(data_length + index_length) FROM information_schema.tables "
    "WHERE table_schema = DATABASE() AND table_name LIKE 'fleche\\_%'"
)


class MysqlDialect(ServerDialect):
    """MariaDB/MySQL (InnoDB): writes in READ COMMITTED, reads of several statements in
    REPEATABLE READ, key locks with ``GET_LOCK(name, timeout)``.

    ``GET_LOCK`` belongs to the connection, not to a transaction, so a key lock is held outside
    any transaction for a whole ``locked`` section; the server wakes a waiter when the holder
    releases and gives up at the (fractional) timeout.
    """

    names = ("mysql", "mariadb")
    binds_buffers = False

    def key_lock_name(self, key: str) -> str:
        """``GET_LOCK`` names are one namespace for the whole server, so the name carries the
        database's too (a digest of it, within MySQL's 64 characters): stores in two databases
        of one server never wait for each other's keys."""
        return f"fleche:{self._database_tag()}:{key[:48]}"

    def _database_tag(self) -> str:
        return hashlib.sha256((self.url.database or "").encode()).hexdigest()[:8]

    def create_engine(self, echo: bool) -> sa.Engine:
        return sa.create_engine(
            self.url, echo=echo, pool_pre_ping=True, isolation_level="READ COMMITTED"
        )

    def upsert(self) -> Any:
        stmt = mysql.insert(calls)
        return stmt.on_duplicate_key_update({name: stmt.inserted[name] for name in UPDATED_COLUMNS})

    def json_text(self, data: Any, entry: str) -> Any | None:
        if SIMPLE_KEY.fullmatch(entry) is None:
            return None  # JSON path quoting differs between SQLite and MySQL; check in Python
        # MariaDB compares a JSON value with a string by meaning; the cast compares text, in a
        # binary collation (the connection's is case-insensitive: '"H1"' = '"h1"'). The path
        # goes in as a binary string: as text in the connection's collation, MariaDB's optimizer
        # takes json_extract(data, '$."Host"') and json_extract(data, '$."host"') for one
        # expression and drops or contradicts one of two conditions on them, so a template
        # naming both entries matched nothing.
        path = sa.literal(f'$."{entry}"'.encode(), sa.LargeBinary)
        text = sa.cast(sa.func.json_extract(data, path), mysql.CHAR(charset="utf8mb4"))
        return text.collate("utf8mb4_bin")

    @contextlib.contextmanager
    def schema_lock(self, conn: sa.Connection) -> Iterator[None]:
        # DDL commits implicitly in MySQL, so this lock lives on the session, not a transaction.
        name = f"fleche_schema:{self._database_tag()}"
        if conn.execute(sa.select(sa.func.get_lock(name, 60))).scalar() != 1:
            raise exc.OperationalError(f"GET_LOCK({name!r})", {}, Exception("timed out"))
        try:
            yield
        finally:
            conn.execute(sa.select(sa.func.release_lock(name)))

    def is_transient(self, error: exc.DBAPIError) -> bool:
        args = getattr(error.orig, "args", None)
        return bool(args) and args[0] in (1205, 1213)  # lock wait timeout, deadlock

    def volume(self, conn: sa.Connection) -> int | None:
        """Data and index bytes of the fleche tables, from ``information_schema``: InnoDB's
        estimate, refreshed as its statistics are."""
        return int(conn.execute(_VOLUME).scalar() or 0)

    @contextlib.contextmanager
    def hold_key(
        self, conn: sa.Connection | None, key: str, timeout: float | None, *, section: bool
    ) -> Iterator[None]:
        assert conn is not None
        params = {"name": self.key_lock_name(key)}
        wait = _YEAR_S if timeout is None else max(0.0, timeout)
        taken = conn.execute(_GET_LOCK, {**params, "timeout": wait}).scalar()
        if taken == 0:
            raise LockTimeout(key, self.key_lock_location(key), wait)
        if taken != 1:  # NULL: an error, e.g. the thread was killed
            raise DatabaseError(self.safe_url, f"GET_LOCK for {key} failed")
        with self._released_on_exit(conn, _RELEASE_LOCK, params):
            yield
