"""PostgreSQL through psycopg 3: a server that every host of a cluster can share."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql

from ....errors import LockTimeout
from .base import BINARY_RESULTS, ServerDialect, lock_id, on_conflict_upsert

__all__ = ["PostgresqlDialect"]

_SCHEMA_LOCK_ID = 0x666C6563  # "flec": the advisory lock guarding table creation
_ID = sa.bindparam("id", type_=sa.BigInteger)
_TRY_LOCK = sa.select(sa.func.pg_try_advisory_lock(_ID))
_LOCK = sa.select(sa.func.pg_advisory_lock(_ID))
_TRY_LOCK_XACT = sa.select(sa.func.pg_try_advisory_xact_lock(_ID))
_LOCK_XACT = sa.select(sa.func.pg_advisory_xact_lock(_ID))
_UNLOCK = sa.select(sa.func.pg_advisory_unlock(_ID))
_DEFAULT_LOCK_TIMEOUT = sa.text("SET LOCAL lock_timeout TO DEFAULT")
_LOCK_NOT_AVAILABLE = "55P03"


_VOLUME = sa.text(
    "SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind = 'r' AND c.relname LIKE 'fleche\\_%' AND n.nspname = current_schema()"
)


def _binary_results(
    conn: sa.Connection, cursor: Any, statement: str, parameters: Any, context: Any,
    executemany: bool,
) -> None:
    """Rows of a statement marked :data:`BINARY_RESULTS` come in PostgreSQL's binary format: a
    ``bytea`` as its bytes, where the text format sends twice as many hex digits to decode. Set
    per cursor (SQLAlchemy makes one per statement, named for a server-side one), before its
    query is sent."""
    if context is not None and context.execution_options.get(BINARY_RESULTS):
        from psycopg import pq  # the engine's driver, so importable

        cursor.format = pq.Format.BINARY


class PostgresqlDialect(ServerDialect):
    """PostgreSQL: writes in READ COMMITTED, reads of several statements in REPEATABLE READ, key
    locks as session-level advisory locks.

    Through psycopg 3, statements marked :data:`~.base.BINARY_RESULTS` (the reads of stored
    values) get their rows in binary format.

    A key lock is tried first (one statement); a waiter then waits in the server with
    ``lock_timeout`` set for that one statement, so it wakes as soon as the holder releases and
    gives up at its deadline. A ``locked`` section's lock is session-level: it outlives the
    transaction it was taken in and is held, outside any transaction, for the whole section. A
    single write's is transaction-level; the two kinds exclude each other.
    """

    names = ("postgresql",)

    def create_engine(self, echo: bool) -> sa.Engine:
        kwargs: dict[str, Any] = {
            "echo": echo, "pool_pre_ping": True, "isolation_level": "READ COMMITTED"
        }
        if "connect_timeout" not in self.url.query:
            kwargs["connect_args"] = {"connect_timeout": 15}
        engine = sa.create_engine(self.url, **kwargs)
        if engine.dialect.driver == "psycopg":  # psycopg2 and others have no binary results
            sa.event.listen(engine, "before_cursor_execute", _binary_results)
        return engine

    def upsert(self) -> Any:
        return on_conflict_upsert(postgresql.insert)

    def json_text(self, data: Any, entry: str) -> Any | None:
        return sa.cast(
            sa.cast(data, postgresql.JSON).op("->", return_type=postgresql.JSON)(
                sa.literal(entry, sa.Text)
            ),
            sa.Text,
        )

    @contextlib.contextmanager
    def schema_lock(self, conn: sa.Connection) -> Iterator[None]:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_ID)))
        yield

    def is_transient(self, error: exc.DBAPIError) -> bool:
        return getattr(error.orig, "sqlstate", None) in ("40001", "40P01", "55P03")

    def volume(self, conn: sa.Connection) -> int | None:
        """``pg_total_relation_size`` of the fleche tables (with indexes and TOAST): space the
        server keeps for them, which a DELETE frees for reuse but does not give back."""
        return int(conn.execute(_VOLUME).scalar() or 0)

    def key_lock_location(self, key: str) -> str:
        return f"{self.safe_url} advisory lock {lock_id(key)}"

    @contextlib.contextmanager
    def hold_key(
        self, conn: sa.Connection | None, key: str, timeout: float | None, *, section: bool
    ) -> Iterator[None]:
        assert conn is not None
        params = {"id": lock_id(key)}
        # A section's lock is session-level (kept until unlocked); a single write's is taken for
        # its transaction, which releases it at the commit, saving a statement.
        try_lock, lock = (_TRY_LOCK, _LOCK) if section else (_TRY_LOCK_XACT, _LOCK_XACT)
        if not conn.execute(try_lock, params).scalar():
            if timeout is not None and timeout <= 0:
                raise LockTimeout(key, self.key_lock_location(key), 0.0)
            # lock_timeout 0 means no limit; a limit is at least 1 ms.
            ms = 0 if timeout is None else max(1, math.ceil(timeout * 1000))
            conn.execute(sa.text(f"SET LOCAL lock_timeout = {ms:d}"))
            try:
                conn.execute(lock, params)
            except exc.OperationalError as e:
                if getattr(e.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
                    raise LockTimeout(key, self.key_lock_location(key), timeout or 0.0) from None
                raise
            conn.execute(_DEFAULT_LOCK_TIMEOUT)  # the transaction's own statements wait as usual
        if not section:
            yield
            return
        with self._released_on_exit(conn, _UNLOCK, params):
            yield
