"""The statements ``Sql`` runs on its hot paths, built once with bound parameters.

Built once, each statement hits SQLAlchemy's compiled cache on every execution instead of being
constructed and looked up anew; values go in as parameters (``key``, ``keys``, column names).
"""

from __future__ import annotations

import contextlib
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

from .schema import arguments, calls, metadata_sections

__all__ = [
    "CONTAINS",
    "DELETE_ARGUMENTS",
    "DELETE_CALL",
    "DELETE_METADATA",
    "EXPAND",
    "INSERT_ARGUMENTS",
    "INSERT_METADATA",
    "LIST_KEYS",
    "NEWEST_STARTED",
    "NEWEST_UNDATED",
    "RECORD_COLUMNS",
    "SELECT_RECORD",
    "SELECT_RECORDS",
    "KeyRead",
]

_KEY = sa.bindparam("key", type_=calls.c.key.type)

RECORD_COLUMNS = (
    calls.c.key,
    calls.c.name,
    calls.c.module,
    calls.c.version,
    calls.c.version_type,
    calls.c.code_digest,
    calls.c.result,
    calls.c.record,
    calls.c.inline,
)
"""The columns of one whole record, in the order ``Sql`` decodes them."""

SELECT_RECORD = sa.select(*RECORD_COLUMNS).where(calls.c.key == _KEY)
SELECT_RECORDS = sa.select(*RECORD_COLUMNS).where(
    calls.c.key.in_(sa.bindparam("keys", expanding=True))
)
CONTAINS = sa.select(calls.c.key).where(calls.c.key == _KEY)
LIST_KEYS = sa.select(calls.c.key).order_by(calls.c.key)
EXPAND = sa.select(calls.c.key).where(
    calls.c.key >= sa.bindparam("low"),
    calls.c.key < sa.bindparam("high"),  # lets the primary key index serve the scan
    calls.c.key.like(sa.bindparam("pattern")),
)
# Newest first, calls without a start last (in key order): two index scans, since databases
# disagree on where NULL sorts and not all of them take NULLS LAST.
NEWEST_STARTED = (
    sa.select(calls.c.key)
    .where(calls.c.started.is_not(None))
    .order_by(calls.c.started.desc(), calls.c.key)
    .limit(sa.bindparam("limit"))
)
NEWEST_UNDATED = (
    sa.select(calls.c.key)
    .where(calls.c.started.is_(None))
    .order_by(calls.c.key)
    .limit(sa.bindparam("limit"))
)

DELETE_CALL = sa.delete(calls).where(calls.c.key == _KEY)
DELETE_ARGUMENTS = sa.delete(arguments).where(arguments.c.call_key == _KEY)
DELETE_METADATA = sa.delete(metadata_sections).where(metadata_sections.c.call_key == _KEY)
INSERT_ARGUMENTS = sa.insert(arguments)
INSERT_METADATA = sa.insert(metadata_sections)

class KeyRead:
    """A one-row SELECT by ``key`` compiled once for a dialect, run on a bare DBAPI connection.

    This skips SQLAlchemy's per-execution machinery (pool checkout, connection wrapper, events,
    result processing), which costs several times the query itself on a cache hit. Only for
    statements whose columns need no result processing on the supported drivers (text and bytes).
    """

    __slots__ = ("sql", "_positional", "_dialect")

    def __init__(self, statement: Any, dialect: Any) -> None:
        compiled = statement.compile(dialect=dialect)
        if list(compiled.positiontup or ["key"]) != ["key"]:
            raise ValueError(f"{statement} must take one parameter, key")
        self.sql: str = compiled.string
        self._positional = bool(compiled.positional)
        self._dialect = dialect

    def first(self, dbapi_connection: Any, key: str) -> Any:
        """The first row for ``key`` (a tuple) or None, read on ``dbapi_connection``.

        Driver errors are raised as SQLAlchemy's ``DBAPIError`` subclasses, like SQLAlchemy
        would, with ``connection_invalidated`` set where the connection is lost (the caller
        replaces it).
        """
        params: Any = (key,) if self._positional else {"key": key}
        dbapi_error = self._dialect.loaded_dbapi.Error
        cursor = None
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute(self.sql, params)
            return cursor.fetchone()
        except dbapi_error as e:
            raise exc.DBAPIError.instance(
                self.sql, params, e, dbapi_error,
                connection_invalidated=self._dialect.is_disconnect(e, dbapi_connection, cursor),
                dialect=self._dialect,
            ) from e
        finally:
            if cursor is not None:
                with contextlib.suppress(dbapi_error):
                    cursor.close()
