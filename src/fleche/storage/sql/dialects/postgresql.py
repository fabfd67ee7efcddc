"""PostgreSQL through psycopg 3: a server that every host of a cluster can share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql

from ..schema import calls
from .base import UPDATED_COLUMNS, Dialect, lock_id

__all__ = ["PostgresqlDialect"]

_SCHEMA_LOCK_ID = 0x666C6563  # "flec": the advisory lock guarding table creation
_LOCK_XACT = sa.select(sa.func.pg_advisory_xact_lock(sa.bindparam("id", type_=sa.BigInteger)))


class PostgresqlDialect(Dialect):
    """PostgreSQL: writes in READ COMMITTED, reads of several statements in REPEATABLE READ, key
    locks as advisory locks."""

    names = ("postgresql",)

    def create_engine(self, echo: bool) -> sa.Engine:
        # Writes run in READ COMMITTED: each statement of a replacing save sees the rows the
        # previous writer committed. Reads switch to REPEATABLE READ for one snapshot.
        kwargs: dict[str, Any] = {
            "echo": echo, "pool_pre_ping": True, "isolation_level": "READ COMMITTED"
        }
        if "connect_timeout" not in self.url.query:
            kwargs["connect_args"] = {"connect_timeout": 15}
        return sa.create_engine(self.url, **kwargs)

    def snapshot(self, engine: sa.Engine) -> Any:
        return engine.execution_options(isolation_level="REPEATABLE READ")

    def writer(self, engine: sa.Engine) -> Any:
        return engine

    def upsert(self) -> Any:
        stmt = postgresql.insert(calls)
        return stmt.on_conflict_do_update(
            index_elements=[calls.c.key],
            set_={name: stmt.excluded[name] for name in UPDATED_COLUMNS},
        )

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

    @contextlib.contextmanager
    def hold_key(self, conn: sa.Connection | None, key: str, timeout: float | None) -> Iterator[None]:
        assert conn is not None
        conn.execute(_LOCK_XACT, {"id": lock_id(key)})  # released when the transaction ends
        yield
