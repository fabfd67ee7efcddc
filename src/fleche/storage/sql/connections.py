"""Connections of ``Sql`` in each process, and the one loop that retries transient failures.

One engine per process and database: :class:`Connections` is made on first use and again after
``fork`` (a child never touches the connections it inherited). Each thread's operation runs on
one connection; nested operations of the thread share it, so one operation is one transaction.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import platformdirs
import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import URL, make_url

from ...errors import DatabaseError
from ..base import Intent
from .dialects import Dialect, dialect_for
from .readers import Readers
from .statements import Compiled, KeyRead, raw_cursor

__all__ = [
    "Connections",
    "connect",
    "deadline",
    "reason",
    "remaining",
    "retrying",
    "safe_url",
    "setup_lock",
    "sqlalchemy_url",
]

T = TypeVar("T")

# Guards the lazy creation of engines. Replaced in a forked child, where it may have been copied
# while another thread of the parent held it.
setup_lock = threading.Lock()


def _fresh_setup_lock() -> None:
    global setup_lock
    setup_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_setup_lock)


def default_path() -> Path:
    """The SQLite file ``Sql()`` uses: ``calls.sqlite`` in the user's cache directory."""
    return Path(platformdirs.user_cache_dir("fleche")) / "calls.sqlite"


def safe_url(url: str | None) -> str:
    """``url`` (an ``Sql`` url setting) with its password replaced by ``***``."""
    if url is None:
        return str(default_path())
    if "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: mask anything between "user:" and "@"
        return re.sub(r"(://[^/@:]*:)[^@]*@", r"\1***@", url)


def reason(e: BaseException) -> str:
    """The first line of what the database said about ``e``."""
    orig = getattr(e, "orig", None) or e
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def sqlalchemy_url(url: str | None) -> URL:
    """The SQLAlchemy URL for an ``Sql`` url setting (``None``, a path, or a URL); the directory
    of a new SQLite file is created."""
    if url is None:
        path = default_path()
    elif "://" not in url:
        path = Path(url)
    else:
        try:
            parsed = make_url(url)
        except exc.ArgumentError as e:
            raise DatabaseError(safe_url(url), f"not a valid database URL ({e})") from None
        if parsed.get_backend_name() in ("mysql", "mariadb") and "charset" not in parsed.query:
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        return parsed
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatabaseError(str(path), f"cannot create its directory: {e}") from None
    return URL.create("sqlite+pysqlite", database=str(path))


def is_transient(dialect: Dialect, e: exc.DBAPIError) -> bool:
    """Whether retrying the transaction may succeed: a lost connection, a racing insert, or
    what the dialect says (deadlock, serialization failure, a busy database)."""
    return e.connection_invalidated or isinstance(e, exc.IntegrityError) or dialect.is_transient(e)


def deadline(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` moment ``timeout`` seconds from now (``None``: never)."""
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never below 0; ``None``: no limit)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def retrying(
    attempt: Callable[[], T],
    retry: Callable[[exc.DBAPIError], bool],
    *,
    attempts: int = 30,
    max_pause: float = 0.5,
) -> T:
    """``attempt()``, run again after a pause while it raises an error ``retry`` accepts.

    The pause grows exponentially from 2 ms, jittered, up to ``max_pause``; the last attempt's
    error is raised as it is. Every retried transaction in ``Sql`` goes through here.
    """
    for n in range(attempts):
        try:
            return attempt()
        except exc.DBAPIError as e:
            if n == attempts - 1 or not retry(e):
                raise
        time.sleep(random.uniform(0, min(max_pause, 0.002 * 2**n)))
    raise AssertionError("unreachable")


class Connections:
    """This process's engine for one database, and the connection each thread works on.

    ``snapshot`` runs read transactions of several statements (one snapshot), ``write`` write
    transactions (see the dialect); :meth:`read_one` runs single-row reads by key, compiled
    once, on ``readers`` (autocommit connections, no pool); ``upsert`` the dialect's upsert of a
    calls row; :meth:`compiled` the statements of the write path, compiled once.
    Thread-safe; made again in a forked child (see ``pid``).
    """

    def __init__(self, dialect: Dialect, engine: sa.Engine) -> None:
        self.pid = os.getpid()
        self.dialect = dialect
        self.engine = engine
        self.snapshot = dialect.snapshot(engine)
        self.write = dialect.writer(engine)
        self._reads: dict[Any, KeyRead] = {}
        self.readers = Readers(engine, dialect.own_read_connections)
        self.upsert = dialect.upsert()
        self.local = threading.local()
        self._compiled: dict[Any, Compiled] = {}

    def compiled(self, statement: Any) -> Compiled:
        """``statement`` compiled for this database, once per process (run it on
        ``statements.raw_cursor``)."""
        found = self._compiled.get(statement)
        if found is None:
            found = self._compiled[statement] = Compiled(statement, self.engine.dialect)
        return found

    def open(self, intent: Intent) -> sa.Connection:
        """A new connection for an operation of kind ``intent`` (``Sql.session``)."""
        return (self.snapshot if intent is Intent.READ else self.write).connect()

    def current(self) -> sa.Connection | None:
        """The connection of the operation running in this thread, if any."""
        return getattr(self.local, "conn", None)

    def _held(self) -> dict[str, int]:
        """The keys whose lock this thread holds, with how often it took each."""
        held = getattr(self.local, "held", None)
        if held is None:
            held = self.local.held = {}
        return held

    @contextlib.contextmanager
    def transaction(
        self, intent: Intent, key: str | None = None, deadline: float | None = None
    ) -> Iterator[sa.Connection]:
        """The connection of the operation running in this thread, or a new one in a
        transaction of kind ``intent``.

        A new write transaction for ``key`` holds the key's lock from before it begins until
        after it ends (``Dialect.hold_key``), waiting for it until ``deadline`` (a
        ``time.monotonic()`` value; ``None``: no limit), unless this thread holds that lock
        already (:meth:`section`). So write operations on one key exclude each other in every
        process, while the database's own write lock, where it has one, is held for the write
        only.
        """
        current = self.current()
        if current is not None:
            yield current
            return
        dialect = self.dialect
        write = intent is Intent.WRITE
        if write:
            dialect.check_writable("write")
        lock = write and key is not None and key not in self._held()
        # A thread holding key locks on a connection writes on it too (no second connection).
        conn = getattr(self.local, "lock_conn", None) if write else None
        with contextlib.ExitStack() as stack:
            if lock and not dialect.locks_with_connection:  # wait holding no connection
                stack.enter_context(
                    dialect.hold_key(None, key, remaining(deadline), section=False)
                )
            if conn is None:
                conn = stack.enter_context(self.open(intent))
            self.local.conn = conn
            try:
                with conn.begin():
                    if lock and dialect.locks_with_connection:
                        stack.enter_context(
                            dialect.hold_key(conn, key, remaining(deadline), section=False)
                        )
                    yield conn
            finally:
                self.local.conn = None

    @contextlib.contextmanager
    def section(self, key: str, deadline: float | None) -> Iterator[None]:
        """Hold ``key``'s lock for this thread while inside, with no transaction open.

        Reentrant. Writes of this thread inside take no lock for ``key`` again; on servers they
        run on the connection that holds the lock, between its transactions. Waits until
        ``deadline`` at most, then raises :class:`~fleche.errors.LockTimeout`.
        """
        held = self._held()
        if key in held:
            held[key] += 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        dialect = self.dialect
        with contextlib.ExitStack() as stack:
            if dialect.locks_with_connection:
                conn = getattr(self.local, "lock_conn", None)
                if conn is None:
                    conn = self.local.lock_conn = self.write.connect()
                    stack.callback(self._close_lock_connection, conn)
                with conn.begin():  # the lock outlives this transaction
                    stack.enter_context(
                        dialect.hold_key(conn, key, remaining(deadline), section=True)
                    )
            else:
                stack.enter_context(dialect.hold_key(None, key, remaining(deadline), section=True))
            held[key] = 1
            try:
                yield
            finally:
                del held[key]

    def _close_lock_connection(self, conn: sa.Connection) -> None:
        self.local.lock_conn = None
        conn.close()

    def read_one(self, statement: Any, key: str) -> Any:
        """The first row the one-row SELECT by ``key`` ``statement`` finds (compiled once, see
        ``statements.KeyRead``; its columns must need no result processing).

        A single statement reads one consistent snapshot in every supported database, so outside
        an operation it runs on its own, in autocommit on one of :attr:`readers`; a connection
        found lost (a server restart, a killed session) is replaced and the read run once more.
        Inside an operation it uses the operation's connection.
        """
        read = self._reads.get(statement)
        if read is None:
            read = self._reads[statement] = KeyRead(statement, self.engine.dialect)
        current = self.current()
        if current is not None:
            with raw_cursor(current) as cursor:
                return read.execute(cursor, {"key": key}).fetchone()
        return retrying(
            lambda: self.readers.run(lambda conn: read.first(conn, key)),
            lambda e: e.connection_invalidated,
            attempts=2,
        )

    def close(self) -> None:
        """Close this process's idle connections (pool and readers); the next operation opens
        new ones."""
        self.readers.close()
        self.engine.dispose()


def connect(url: str | None, echo: bool) -> Connections:
    """Connections to the database of an ``Sql`` url setting, its tables made or checked."""
    from .schema import ensure_schema

    address = sqlalchemy_url(url)
    safe = address.render_as_string(hide_password=True)
    dialect = dialect_for(address)
    try:
        engine = dialect.create_engine(echo)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as e:
        raise DatabaseError(safe, f"not a usable database URL ({e})") from None
    try:
        ensure_schema(engine, dialect)
    except BaseException:
        engine.dispose()
        raise
    return Connections(dialect, engine)
