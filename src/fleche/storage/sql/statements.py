"""The statements ``Sql`` runs on its hot paths, built once with bound parameters.

Built once, each statement hits SQLAlchemy's compiled cache on every execution instead of being
constructed and looked up anew; values go in as parameters (``key``, ``keys``, column names).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
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
    "KEY_AFTER",
    "KEY_BEFORE",
    "LIST_KEYS",
    "NEWEST_STARTED",
    "NEWEST_UNDATED",
    "RECORD_COLUMNS",
    "SELECT_RECORD",
    "SELECT_RECORDS",
    "Compiled",
    "KeyRead",
    "raw_cursor",
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
KEY_BEFORE = sa.select(calls.c.key).where(calls.c.key < _KEY).order_by(calls.c.key.desc()).limit(1)
KEY_AFTER = sa.select(calls.c.key).where(calls.c.key > _KEY).order_by(calls.c.key).limit(1)
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

class Compiled:
    """A statement compiled once for a dialect, run on a bare DBAPI cursor.

    This skips SQLAlchemy's per-execution machinery (connection wrapper, events, parameter and
    result processing), which costs several times the statement itself on the hot paths of a
    hit (one read) and a miss (the writes of one record). Parameters are given by name; the
    few types that convert their values for the driver (floats on SQLite) still do. Only for
    statements whose result columns need no processing on the supported drivers (text, bytes).
    """

    __slots__ = ("sql", "_names", "_processors", "_dialect", "_order")

    def __init__(self, statement: Any, dialect: Any) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql: str = compiled.string
        self._names: tuple[str, ...] | None = (
            tuple(compiled.positiontup or ()) if compiled.positional else None
        )
        # The positional parameters' values, in order, from a dict of them by name.
        names = self._names
        self._order: Callable[[dict[str, Any]], Any] | None = (
            None if names is None
            else (lambda params: ()) if not names
            else (lambda params, name=names[0]: (params[name],)) if len(names) == 1
            else operator.itemgetter(*names)
        )
        processors = {}
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                processors[name] = process
        self._processors: dict[str, Callable[[Any], Any]] = processors
        self._dialect = dialect

    def _parameters(self, params: dict[str, Any]) -> Any:
        if self._processors:
            params = {
                n: (p(params[n]) if (p := self._processors.get(n)) else params[n]) for n in params
            }
        return params if self._order is None else self._order(params)

    def execute(self, cursor: Any, params: dict[str, Any]) -> Any:
        """Run the statement with ``params`` on ``cursor``; return the cursor.

        Driver errors are raised as SQLAlchemy's ``DBAPIError`` subclasses, like SQLAlchemy
        would, with ``connection_invalidated`` set where the connection is lost."""
        bound = self._parameters(params)
        try:
            cursor.execute(self.sql, bound)
        except self._dialect.loaded_dbapi.Error as e:
            raise self._wrapped(e, bound, cursor) from e
        return cursor

    def executemany(self, cursor: Any, rows: list[dict[str, Any]]) -> None:
        """Run the statement once per row of ``rows`` on ``cursor``, in one driver call; errors
        as :meth:`execute` raises them."""
        bound = [self._parameters(row) for row in rows]
        try:
            cursor.executemany(self.sql, bound)
        except self._dialect.loaded_dbapi.Error as e:
            raise self._wrapped(e, bound, cursor) from e

    def _wrapped(self, error: Exception, params: Any, cursor: Any) -> exc.DBAPIError:
        return exc.DBAPIError.instance(
            self.sql, params, error, self._dialect.loaded_dbapi.Error,
            connection_invalidated=self._dialect.is_disconnect(error, cursor.connection, cursor),
            dialect=self._dialect,
        )


class KeyRead(Compiled):
    """A one-row SELECT by ``key`` compiled once for a dialect, run on a bare DBAPI connection
    (see :class:`Compiled`)."""

    __slots__ = ()

    def __init__(self, statement: Any, dialect: Any) -> None:
        super().__init__(statement, dialect)
        if list(self._names or ["key"]) != ["key"]:
            raise ValueError(f"{statement} must take one parameter, key")

    def first(self, dbapi_connection: Any, key: str) -> Any:
        """The first row for ``key`` (a tuple) or None, read on ``dbapi_connection``; errors as
        :meth:`Compiled.execute` raises them."""
        params = self._parameters({"key": key})
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


@contextlib.contextmanager
def raw_cursor(conn: sa.Connection) -> Iterator[Any]:
    """A DBAPI cursor on the connection under ``conn`` (in ``conn``'s transaction), closed on
    leaving; a lost connection found meanwhile is invalidated, so the pool replaces it."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        yield cursor
    except exc.DBAPIError as e:
        if e.connection_invalidated and not conn.invalidated:
            conn.invalidate()
        raise
    finally:
        with contextlib.suppress(Exception):
            cursor.close()
