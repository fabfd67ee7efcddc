"""A store directory's call records in one SQLite file, ``DIR/index.sqlite`` (the index layout).

Each call record is one row of the table ``calls``: its key, the function's name, when it
started and was last used, and the record itself with its inline values, pickled in the same
checked, optionally signed envelope as a pickle file (:func:`~.pickle_file.seal_pickle`), so a
torn, bit-flipped or tampered row reads as :class:`~fleche.errors.CorruptEntryError` before
anything is unpickled. Values too large to be inline stay pickle files in ``DIR/values``; key
locks are the stripes in ``DIR/.locks`` (:mod:`fleche.storage.locks`).

The database is in WAL mode with ``synchronous=NORMAL`` (``FULL`` with ``durable=True``): a
miss is one short write transaction, a hit one indexed SELECT, readers never wait for the
writer and see whole rows only. A committed row survives a crash of any process; with
``durable=False`` a power cut may lose the last transactions but never tears one. Only the
standard library's ``sqlite3`` is used, so this needs no extra. SQLite's locking is unreliable
on network filesystems: :func:`check_local` refuses them.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..call import DigestedCall, QueryCall
from ..counters import BYTES_WRITTEN
from ..digest import DIGEST_LENGTH, MIN_PREFIX_LENGTH, Digest, _mk
from ..errors import DatabaseError, WriteError
from .base import CallMixin, EntryUsage, _check_key_text, _not_a_call_record, _unique_match
from .file import _tree_size
from .filesystems import is_network_path
from .locks import InterProcessLockMixin
from .pickle_file import PickleFileBackend, open_pickle, seal_pickle
from .thread_safe import PerKeyLockMixin

__all__ = ["INDEX_NAME", "CallDirectoryIndex", "DirectoryIndexBackend", "check_local"]

INDEX_NAME = "index.sqlite"
"""The file of a store directory that holds its call records in the index layout."""

SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of an index this fleche writes; a newer one is refused."""

BUSY_TIMEOUT_S = 30.0
"""How long a statement waits for another connection's write to finish before failing."""

# Waiting for another writer: our own polling, from 50 µs up to every 5 ms. SQLite's own busy
# handler sleeps at least a millisecond, twenty times a whole write.
_FIRST_WAIT = 0.00005
_MAX_WAIT = 0.005

_CHUNK = 500  # keys per IN (...) list, well below SQLite's limit on parameters
_CREATE = (
    "CREATE TABLE IF NOT EXISTS calls ("
    " key TEXT PRIMARY KEY NOT NULL, name TEXT NOT NULL, start TEXT, used REAL NOT NULL,"
    " entry BLOB NOT NULL)"
)
# newest() walks this index from its start and stops at the limit: ``fleche ls --limit`` stays
# flat as the store grows (NULL starts sort last in a descending scan).
_CREATE_START_INDEX = "CREATE INDEX IF NOT EXISTS calls_by_start ON calls (start DESC, key)"
# Reads of the index map its pages instead of copying them through SQLite's page cache of each
# connection, which another process's write empties: a hit costs the same in a store of 10^3
# calls and of 10^5 (the kernel's page cache is shared by every process).
_MMAP = "PRAGMA mmap_size = 1073741824"
_PUT = "INSERT OR REPLACE INTO calls (key, name, start, used, entry) VALUES (?, ?, ?, ?, ?)"
_GET = "SELECT entry FROM calls WHERE key = ?"
_CONTAINS = "SELECT 1 FROM calls WHERE key = ?"
_DELETE = "DELETE FROM calls WHERE key = ?"
_LIST = "SELECT key FROM calls ORDER BY key"
_PREFIX = "SELECT key FROM calls WHERE key >= ? AND key < ? ORDER BY key"
_BEFORE = "SELECT key FROM calls WHERE key < ? ORDER BY key DESC LIMIT 1"
_AFTER = "SELECT key FROM calls WHERE key > ? ORDER BY key LIMIT 1"
_USAGE = "SELECT key, length(entry), used FROM calls"
_TOUCH = "UPDATE calls SET used = ? WHERE key = ? AND used < ?"
_ALL = "SELECT key, entry FROM calls"
_BY_NAME = "SELECT key, entry FROM calls WHERE name = ?"
_NEWEST = "SELECT key FROM calls WHERE name != '' ORDER BY start DESC, key LIMIT ?"

_T = TypeVar("_T")
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

_inherited: list[sqlite3.Connection] = []
"""Connections a forked child inherited: never used, never closed (closing one in the child
could disturb the parent's use of the same file)."""


def check_local(directory: str) -> None:
    """Refuse (:class:`~fleche.errors.DatabaseError`) a store directory on a network
    filesystem, where SQLite can neither use WAL mode nor lock reliably."""
    network, fstype = is_network_path(directory)
    if network:
        raise DatabaseError(
            f"{directory}/{INDEX_NAME}",
            f"it is on a network filesystem ({fstype}), where SQLite cannot lock reliably; use "
            "layout=files for a store directory there (or PostgreSQL for the calls)",
        )


class _Connections(threading.local):
    """This thread's connection to the index, and the process and generation it was opened
    in (a fork or :meth:`DirectoryIndexBackend.close` makes it stale)."""

    conn: sqlite3.Connection | None = None
    pid: int = 0
    generation: int = 0
    inode: tuple[int, int] | None = None


@dataclass(frozen=True)
class DirectoryIndexBackend(PickleFileBackend):
    """Call records as rows of ``root/index.sqlite``, each a pickle entry in its envelope.

    ``root`` is the store directory (values live in ``root/values``, which this backend never
    touches). Each thread of each process keeps one connection, opened on first use and again
    after a fork, an unpickling or :meth:`close`; reads of a store with no index yet find
    nothing and create nothing. The index is created by the first write; if it is deleted or
    replaced while a process runs, each thread's next write opens the new one (its reads until
    then still see the old one). Opening the index on a network filesystem raises
    :class:`~fleche.errors.DatabaseError` (see :func:`check_local`).
    """

    _connections: _Connections = field(
        default_factory=_Connections, init=False, repr=False, compare=False
    )
    _generation: list[int] = field(
        default_factory=lambda: [0], init=False, repr=False, compare=False
    )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_connections", None)
        state.pop("_generation", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        object.__setattr__(self, "_connections", _Connections())
        object.__setattr__(self, "_generation", [0])

    # -- where things are -----------------------------------------------------------------------

    def index_path(self) -> str:
        """The SQLite file holding the records (its root resolved in this process)."""
        return f"{self._real_root}/{INDEX_NAME}"

    def _path(self, key: Digest) -> str:
        return self.index_path()

    def _location(self, key: Digest) -> str:
        return f"{self.index_path()} row {key}"

    # -- connections ----------------------------------------------------------------------------

    def _conn(self, *, write: bool = False) -> sqlite3.Connection | None:
        """This thread's connection; ``None`` for a read while there is no index yet."""
        local = self._connections
        conn = local.conn
        if conn is not None and local.pid == os.getpid() and local.generation == self._generation[0]:
            if not write or self._same_index(local.inode):
                return conn
        if conn is not None:
            if local.pid == os.getpid():
                conn.close()
            else:
                _inherited.append(conn)
            local.conn = None
        path = self.index_path()
        if not write and not os.path.exists(path):
            return None
        conn = self._open(path)
        local.conn, local.pid, local.generation = conn, os.getpid(), self._generation[0]
        local.inode = self._inode()
        return conn

    def _inode(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.index_path())
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _same_index(self, inode: tuple[int, int] | None) -> bool:
        """Whether the file at the index path is still the one connected to (one ``stat``)."""
        return inode is not None and self._inode() == inode

    def _open(self, path: str) -> sqlite3.Connection:
        check_local(self._real_root)
        try:
            os.makedirs(self._real_root, exist_ok=True)
            conn = sqlite3.connect(path, timeout=0, isolation_level=None, cached_statements=64)
        except (OSError, sqlite3.Error) as e:
            raise DatabaseError(path, f"cannot open it: {_why(path, e)}") from e
        try:
            synchronous = f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'}"
            _when_free(lambda: conn.execute(synchronous))
            _when_free(lambda: conn.execute(_MMAP))
            version = _when_free(lambda: conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.Error as e:
            conn.close()
            raise DatabaseError(path, f"cannot read it: {_why(path, e)}") from e
        if version != SCHEMA_VERSION:
            try:
                self._create(conn, path)
            except BaseException:
                conn.close()
                raise
        return conn

    def _create(self, conn: sqlite3.Connection, path: str) -> None:
        """Make the table (once, in one write transaction), or refuse an index of another
        version."""
        def create() -> int:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found == 0:
                conn.execute(_CREATE)
                conn.execute(_CREATE_START_INDEX)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return found

        try:
            _when_free(lambda: conn.execute("PRAGMA journal_mode = WAL"))
            version = _transaction(conn, create)
        except sqlite3.Error as e:
            raise DatabaseError(path, f"cannot create the index: {e}") from e
        if version not in (0, SCHEMA_VERSION):
            raise DatabaseError(
                path, f"it is an index of format {version}, but this fleche reads format "
                f"{SCHEMA_VERSION}: upgrade fleche"
            )

    def _read(self, sql: str, params: Any = ()) -> list[Any]:
        """The rows of one read statement (none while there is no index)."""
        conn = self._conn()
        if conn is None:
            return []
        try:
            return _when_free(lambda: conn.execute(sql, params).fetchall())
        except sqlite3.Error as e:
            raise DatabaseError(self.index_path(), f"cannot read it: {e}") from e

    def _write(self, key: str, sql: str, params: Any) -> int:
        """Run one write statement in its own transaction; the rows it changed.

        A refusal of the file system (read-only, disk full, permission denied) raises
        :class:`~fleche.errors.WriteError` and changes nothing.
        """
        conn = self._conn(write=True)
        assert conn is not None
        try:
            return _when_free(lambda: conn.execute(sql, params).rowcount)
        except sqlite3.Error as e:
            raise WriteError(key, self.index_path(), None, f"SQLite refused the write: {e}") from e

    def close(self) -> None:
        """Close this thread's connection; other threads reopen theirs on their next operation.
        The storage stays usable."""
        self._generation[0] += 1
        conn, self._connections.conn = self._connections.conn, None
        if conn is not None and self._connections.pid == os.getpid():
            conn.close()

    # -- backend primitives ---------------------------------------------------------------------

    def put(self, value: Any, key: Digest) -> Digest:
        """Write the record ``value`` under ``key`` in one transaction, replacing any row.

        Readers in every thread and process see the old row or the new one. A refusal of the
        file system raises :class:`~fleche.errors.WriteError`, leaving the old row intact.
        """
        entry = seal_pickle(
            value, key, "pickle", self._secrets(), self.compression, self.index_path()
        )
        name, start = _name_and_start(value)
        self._write(key, _PUT, (key, name, start, time.time(), entry))
        BYTES_WRITTEN.add("bytes", len(entry))
        return key

    def get(self, key: Digest) -> Any:
        """The record under ``key``: one indexed SELECT, no lock; ``KeyError`` if there is none,
        :class:`~fleche.errors.CorruptEntryError` if its row is torn or tampered with."""
        conn = self._conn()
        row = None
        if conn is not None:
            try:
                row = _when_free(lambda: conn.execute(_GET, (key,)).fetchone())
            except sqlite3.Error as e:
                raise DatabaseError(self.index_path(), f"cannot read it: {e}") from e
        if row is None:
            raise KeyError(f"nothing stored under {key}")
        return open_pickle(row[0], key, self._location(key), self._secrets())

    def _contains(self, key: Digest) -> bool:
        return bool(self._read(_CONTAINS, (key,)))

    def _evict(self, key: Digest) -> None:
        if not os.path.exists(self.index_path()) or not self._write(key, _DELETE, (key,)):
            raise KeyError(f"nothing stored under {key}")

    def list(self) -> Iterable[Digest]:
        """Every stored key, sorted: a snapshot of one moment, which other processes may
        change at once."""
        return [_mk(k) for (k,) in self._read(_LIST)]

    def expand(self, key: Digest | str) -> Digest:
        """Expands a short-hand digest to the full length one.

        The prefix search is one range scan of the key index. Raises ``KeyError`` if no stored
        key starts with the prefix and :class:`~fleche.errors.AmbiguousDigestError` if several
        do; a snapshot that concurrent saves may make ambiguous.
        """
        text = _check_key_text(key)  # hex only
        if len(text) == DIGEST_LENGTH or len(text) < MIN_PREFIX_LENGTH:
            return super().expand(text)
        return _unique_match(text, [k for (k,) in self._read(_PREFIX, (text, text + "g"))])

    def shrink(self, key: Digest | str, /, *keys: Digest | str) -> Any:
        """Find the shortest substring(s) that unambiguously reference each key.

        Two indexed lookups per key (its neighbours in key order) instead of a listing; raises
        ``KeyError`` for a key that is not stored. A snapshot: a key stored later may make a
        returned prefix ambiguous.
        """
        full = [self._normalize_key(k) for k in (key, *keys)]
        shrunk = []
        for k in full:
            if not self._contains(k):
                raise KeyError(f"nothing stored under {k}: only stored keys can be shrunk")
            near = [r[0] for sql in (_BEFORE, _AFTER) for r in self._read(sql, (k,))]
            shrunk.append(self._shrink_one(k, sorted([*near, k])))
        return tuple(shrunk) if keys else shrunk[0]

    def contains_many(self, keys: Iterable[Digest | str]) -> set[Digest]:
        """The full keys of those among ``keys`` that are stored: one IN query per 500 keys, a
        snapshot."""
        full = self._full_keys(keys)
        found: set[Digest] = set()
        for i in range(0, len(full), _CHUNK):
            chunk = full[i:i + _CHUNK]
            sql = f"SELECT key FROM calls WHERE key IN ({','.join('?' * len(chunk))})"
            found.update(_mk(k) for (k,) in self._read(sql, chunk))
        return found

    def usage(self) -> dict[Digest, EntryUsage]:
        """Every stored key with its row's entry size and when it was last saved or touched:
        one table scan, a snapshot."""
        return {_mk(k): EntryUsage(size, used) for k, size, used in self._read(_USAGE)}

    def touch(self, keys: Iterable[Digest | str], when: float | None = None) -> None:
        """Move the last use of each stored key forward to ``when`` (default now) in one
        transaction; keys not stored are skipped, later uses kept; takes no key lock."""
        when = time.time() if when is None else when
        full = self._full_keys(keys)
        if not full or not os.path.exists(self.index_path()):
            return
        conn = self._conn(write=True)
        assert conn is not None
        rows = [(when, k, when) for k in full]
        try:
            _transaction(conn, lambda: conn.executemany(_TOUCH, rows))
        except sqlite3.Error as e:
            raise WriteError(full[0], self.index_path(), None, f"SQLite refused the write: {e}") from e

    def volume(self) -> int:
        """Bytes of the index (its database, WAL and shared-memory files) and the lock files;
        0 before the first write. The values' files are the value storage's."""
        total = _tree_size(self._lock_directory())
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(self.index_path() + suffix).st_size
            except FileNotFoundError:
                pass
        return total

    def sweep(self, older_than: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Nothing to sweep: SQLite rolls back what a killed writer left (``[]``)."""
        return []

    def newest(self, limit: int) -> list[Digest]:
        """The keys of the ``limit`` calls started last (their ``runtime`` metadata's
        ``start``), newest first; calls without a start come last. One ``ORDER BY`` over the
        table's start column, no record unpickled (a damaged row still counts); a snapshot."""
        if limit < 0:
            raise ValueError(f"limit must be 0 or more, got {limit}")
        return [_mk(k) for (k,) in self._read(_NEWEST, (limit,))]

    def query(self, template: QueryCall) -> Iterator[DigestedCall]:
        """Every stored call matching ``template``: one scan of the table (of the function's
        rows only, when the template names it), each row decoded and matched; a snapshot.
        Raises :class:`~fleche.errors.CorruptEntryError` for a row it cannot read or that holds
        something other than a call record."""
        if template.name is not None:
            rows = self._read(_BY_NAME, (template.name,))
        else:
            rows = self._read(_ALL)
        for key, entry in rows:
            call = open_pickle(entry, _mk(key), self._location(key), self._secrets())
            if not isinstance(call, DigestedCall):
                raise _not_a_call_record(call, key, self._location(key))
            if template.matches(call):
                yield call


def _when_free(statement: Callable[[], _T]) -> _T:
    """``statement()``, run again while another connection's lock makes SQLite refuse it
    (``SQLITE_BUSY``), polling from 50 µs up to every 5 ms for at most :data:`BUSY_TIMEOUT_S`."""
    delay, deadline = _FIRST_WAIT, 0.0
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF not in _BUSY:
                raise
            now = time.monotonic()
            if not deadline:
                deadline = now + BUSY_TIMEOUT_S
            elif now >= deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, _MAX_WAIT)


def _transaction(conn: sqlite3.Connection, body: Callable[[], _T]) -> _T:
    """``body()`` in one write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), rolled back
    if it fails, the whole of it run again while another writer holds the database."""

    def attempt() -> _T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    return _when_free(attempt)


def _why(path: str, error: Exception) -> str:
    """What keeps ``path`` from being used: the system's reason (say, ``Permission denied``)
    where opening the file itself fails, else ``error``."""
    if isinstance(error, OSError):
        return f"{error.strerror or error}"
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"{e.strerror} ({error})"
    return str(error)


def _name_and_start(record: Any) -> tuple[str, str | None]:
    """The function name and the recorded start of a call record, for the columns that let
    queries pick rows without unpickling them."""
    if not isinstance(record, DigestedCall):
        return "", None
    runtime = (record.metadata or {}).get("runtime")
    start = runtime.get("start") if isinstance(runtime, dict) else None
    return str(record.name), start if isinstance(start, str) else None


@dataclass(frozen=True)
class CallDirectoryIndex(PerKeyLockMixin, InterProcessLockMixin, CallMixin, DirectoryIndexBackend):
    """A call storage of rows in ``root/index.sqlite``, safe to share between threads and
    processes of one host (or of hosts sharing a local-semantics filesystem).

    Writes, evictions and ``locked`` sections on a key exclude each other in every thread and
    process through the key's lock stripe in ``root/.locks``; reads take no lock (SQLite gives
    each statement one snapshot). An intact row that holds something other than a call
    record loads as :class:`~fleche.errors.CorruptEntryError` saying what it holds.

    >>> import tempfile
    >>> from fleche.call import Call
    >>> calls = CallDirectoryIndex(tempfile.mkdtemp())
    >>> key = calls.save(Call("square", {"x": "0" * 64}))
    >>> calls.load(key).name
    'square'
    """

    keeps_inline_values = True

    # CallMixin (and CallStorage's defaults) come before the backend in the MRO: these take
    # the backend's SQL instead of a load per listed key.

    def query(self, template: QueryCall) -> Iterator[DigestedCall]:
        """See :meth:`DirectoryIndexBackend.query`: one scan of the table, a snapshot."""
        return DirectoryIndexBackend.query(self, template)

    def newest(self, limit: int) -> list[Digest]:
        """See :meth:`DirectoryIndexBackend.newest`: one ``ORDER BY``, a snapshot."""
        return DirectoryIndexBackend.newest(self, limit)

