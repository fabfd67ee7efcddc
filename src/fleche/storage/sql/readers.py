"""The connections single-statement reads run on: bare DBAPI connections in autocommit.

A cache hit on a database server is one ``SELECT`` by key. Through SQLAlchemy's pool it also
pays a pre-ping, a ``BEGIN`` and a ``ROLLBACK`` (three more round trips) and the pool's
bookkeeping. :class:`Readers` keeps this process's idle read connections instead: a read takes
one, runs its statement in autocommit (one statement reads one snapshot in every supported
database) and gives it back. A dead connection is found by the read's error, not by pinging.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc

__all__ = ["Readers"]

T = TypeVar("T")

IDLE = 8
"""Idle read connections a process keeps per database; more are closed when given back."""


def _close_all(idle: list[Any], pid: int) -> None:
    """Close the connections in ``idle``, in the process ``pid`` that opened them only: a forked
    child closing inherited ones would end the parent's sessions."""
    if os.getpid() != pid:
        return
    while idle:
        conn = idle.pop()
        with contextlib.suppress(Exception):
            conn.close()


class Readers:
    """This process's autocommit DBAPI connections to one database, shared by its threads.

    Thread-safe without a lock: taking and giving back are single list operations. Opened like
    ``engine``'s (its connect-time setup applies) but apart from its pool, so they never take a
    connection or a slot from writers. Closed by :meth:`close`, by ``engine.dispose()`` and
    when garbage-collected, in the process that opened them only; a forked child opens its own.
    Without ``own`` (an in-memory SQLite database, which each new connection would see empty),
    each read checks a connection out of the engine's pool instead.
    """

    def __init__(self, engine: sa.Engine, own: bool = True) -> None:
        self.engine = engine
        self.own = own
        """Whether reads run on connections of our own; else on the engine's pool (see
        ``Dialect.own_read_connections``)."""
        # A pool of our own, made like the engine's (its connect-time setup included), that
        # opens each new connection without taking one of the engine's.
        self._source = engine.pool.recreate() if own else engine.pool
        self.pid = os.getpid()
        self.idle: list[Any] = []
        idle, pid = self.idle, self.pid
        self._finalizer = weakref.finalize(self, _close_all, idle, pid)
        event.listen(engine, "engine_disposed", lambda _engine: _close_all(idle, pid))

    def _open(self) -> Any:
        """A new DBAPI connection in autocommit."""
        fairy = self._source.connect()
        fairy.detach()
        conn = fairy.dbapi_connection
        try:
            self.engine.dialect.set_isolation_level(conn, "AUTOCOMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    def run(self, read: Callable[[Any], T]) -> T:
        """``read(connection)`` on an idle connection (a new one if none is idle).

        The connection is given back unless ``read`` raised a ``DBAPIError`` saying it is lost
        (``connection_invalidated``: then the idle ones are closed too, as after a server
        restart) or was interrupted mid-statement; then it is closed and the error raised, for
        the caller to retry on a fresh one.
        """
        if not self.own:
            return self._run_pooled(read)
        try:
            conn = self.idle.pop()
        except IndexError:
            conn = self._open()
        try:
            result = read(conn)
        except exc.DBAPIError as e:
            if e.connection_invalidated:
                # Likely a server restart, which took the idle ones too: start afresh.
                self._discard(conn)
                self.close()
            else:
                self._give_back(conn)
            raise
        except BaseException:
            self._discard(conn)
            raise
        self._give_back(conn)
        return result

    def _run_pooled(self, read: Callable[[Any], T]) -> T:
        """``read(connection)`` on a connection of the engine's pool, returned to it after."""
        fairy = self.engine.raw_connection()
        try:
            return read(fairy.dbapi_connection)
        except exc.DBAPIError as e:
            if e.connection_invalidated:
                fairy.invalidate(e)
            raise
        finally:
            fairy.close()

    def _give_back(self, conn: Any) -> None:
        if len(self.idle) < IDLE:
            self.idle.append(conn)
        else:
            self._discard(conn)

    @staticmethod
    def _discard(conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def close(self) -> None:
        """Close the idle connections (those in use are closed or kept when given back); the
        next read opens a new one."""
        _close_all(self.idle, self.pid)
