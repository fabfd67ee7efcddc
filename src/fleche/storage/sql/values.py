"""``SqlValues``: values in the database of an ``Sql`` call storage, so a database URL alone is a
complete store (``postgresql://host/db``, ``mysql://host/db``, ``sqlite:///path.db``).

Each value is one pickle entry in the envelope of :mod:`fleche.storage.pickle_file` (checked,
optionally signed and compressed), deduplicated by its digest, the key. Its header and the first
:data:`CHUNK_BYTES` of its payload are one row of ``fleche_values``; the rest of a large payload
follows in chunks of that size in ``fleche_value_chunks``, so no statement carries more than a
chunk (under MariaDB's default ``max_allowed_packet`` of 16 MiB) and a value of hundreds of MB
is written chunk by chunk from its pickle and read chunk by chunk into one buffer. A value's
rows are written in one transaction under the key's lock, and read in one snapshot, so a reader
in any process sees the old value or the new one, whole.

Payload bytes travel as bytes where the driver can: psycopg 3 sends chunks as binary parameters
and, for the statements marked :data:`~.dialects.base.BINARY_RESULTS`, receives them in binary
format (its default text format sends ``bytea`` as hex, twice the bytes, to decode); PyMySQL
receives a ``BLOB`` as its bytes but writes it into the statement as a hex literal, having no
binary parameters.

Built on an :class:`~fleche.storage.sql.Sql` call storage and its connections (one URL, one
pool): a :class:`~fleche.caches.Cache` of ``SqlValues(calls)`` and ``calls`` writes a call's
values and its record in one transaction (``Sql.save_together``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import sqlalchemy as sa

from ...counters import BYTES_WRITTEN
from ...digest import DIGEST_LENGTH, MIN_PREFIX_LENGTH, Digest, _mk
from ...errors import CorruptEntryError
from ..base import (
    EntryUsage,
    Intent,
    StorageBackend,
    ValueMixin,
    _check_key_text,
    _unique_match,
)
from ..destructuring import DestructuringMixin
from ..envelope import as_secrets, check_compression
from ..pickle_file import check_serializer, open_pickle_parts, seal_pickle_parts, secrets_of
from ..thread_safe import PerKeyLockMixin
from . import connections as _connections
from .connections import is_transient, retrying, safe_url
from .dialects.base import BINARY_RESULTS
from .schema import value_chunks, values
from .statements import raw_cursor
from .storage import Sql

__all__ = ["CHUNK_BYTES", "SqlValueBackend", "SqlValues"]

CHUNK_BYTES = 4 * 2**20
"""Bytes of payload per row: a value's first chunk is in its ``fleche_values`` row, the others
in ``fleche_value_chunks``."""

_KEY = sa.bindparam("key", type_=values.c.key.type)
_SELECT = (
    sa.select(values.c.header, values.c.size, values.c.chunks, values.c.data)
    .where(values.c.key == _KEY)
    .execution_options(**{BINARY_RESULTS: True})  # payload bytes as bytes, not hex text
)
_SELECT_SMALL = sa.select(
    values.c.header,
    values.c.size,
    values.c.chunks,
    # The payload only where it is all in this row: a larger value is read again whole.
    sa.case((values.c.chunks == sa.literal_column("1"), values.c.data), else_=sa.null()),
).where(values.c.key == _KEY)
_SELECT_CHUNKS = (
    sa.select(value_chunks.c.n, value_chunks.c.data)
    .where(value_chunks.c.key == _KEY)
    .order_by(value_chunks.c.n)
    # one chunk in memory at a time, on every driver; its bytes as bytes, not hex text
    .execution_options(yield_per=1, **{BINARY_RESULTS: True})
)
_CONTAINS = sa.select(values.c.key).where(values.c.key == _KEY)
_LIST = sa.select(values.c.key).order_by(values.c.key)
_EXPAND = sa.select(values.c.key).where(
    values.c.key >= sa.bindparam("low"),
    values.c.key < sa.bindparam("high"),  # lets the primary key index serve the scan
    values.c.key.like(sa.bindparam("pattern")),
)
_DELETE_CHUNKS = sa.delete(value_chunks).where(value_chunks.c.key == _KEY)
_DELETE = sa.delete(values).where(values.c.key == _KEY)
_INSERT = sa.insert(values)
_INSERT_CHUNK = sa.insert(value_chunks)
_BYTES = values.c.size + sa.func.length(values.c.header)
_USAGE = sa.select(values.c.key, _BYTES, values.c.used)
_VOLUME = sa.select(sa.func.coalesce(sa.func.sum(_BYTES), 0))
_TOUCH = (
    sa.update(values)
    .where(values.c.key.in_(sa.bindparam("keys", expanding=True)), values.c.used < sa.bindparam("when"))
    .values(used=sa.bindparam("when"))
)
_BATCH = 500
"""Keys per ``IN (...)``."""


@dataclass(frozen=True)
class SqlValueBackend(StorageBackend):
    """Backend keeping values in the database of the ``Sql`` call storage ``database`` (or of
    the ``Sql`` made from it, if it is a URL, a path or ``None``, as ``Sql`` takes them).

    ``serializer``, ``compression`` and ``secret_key`` are those of pickle files (see
    :class:`~fleche.storage.PickleFileBackend`): every value is checksummed, and signed when a
    key is set here or in ``FLECHE_SECRET_KEY``. ``lock_timeout`` bounds the wait for a key's
    locks (this process's thread lock and the database's key lock) before
    :class:`~fleche.errors.LockTimeout`. Pickles as its settings; equal settings, one store.
    """

    database: Sql | str | None = None
    serializer: str = "pickle"
    compression: str | None = None
    lock_timeout: float | None = 1.0
    secret_key: bytes | str | Sequence[bytes | str] | None = field(default=None, repr=False)

    _atomic_writes: ClassVar[bool] = True  # a value's rows change in one transaction

    def __post_init__(self) -> None:
        if not isinstance(self.database, Sql):
            object.__setattr__(self, "database", Sql(self.database, lock_timeout=self.lock_timeout))
        check_serializer(self.serializer)
        check_compression(self.compression)
        timeout = self.lock_timeout
        if timeout is not None and not (
            type(timeout) in (int, float) and math.isfinite(timeout) and timeout >= 0
        ):
            raise ValueError(f"lock_timeout must be a number >= 0 or None, got {timeout!r}")
        object.__setattr__(self, "secret_key", as_secrets(self.secret_key) or None)

    @property
    def sql(self) -> Sql:
        """The call storage whose database and connections this storage uses."""
        return self.database  # type: ignore[return-value]

    def _secrets(self) -> tuple[bytes, ...]:
        return secrets_of(self.secret_key)  # type: ignore[arg-type]

    def _location(self, key: Digest) -> str:
        return f"{safe_url(self.sql.url)} table fleche_values key {key}"

    def _where(self) -> str:
        return f"{safe_url(self.sql.url)} table fleche_values"

    def _writing(self, key: Digest, work: Callable[[sa.Connection], Any]) -> Any:
        """``work(conn)`` in a write transaction holding ``key``'s database lock, run again
        after a transient conflict; inside an operation of this thread (a ``save_together``
        of the call storage, a destructured save), in its transaction, whose owner retries."""
        state = self.sql._connect()
        current = state.current()
        if current is not None:
            return work(current)
        until = _connections.deadline(self.lock_timeout)

        def attempt() -> Any:
            with state.transaction(Intent.WRITE, str(key), until) as conn:
                return work(conn)

        return retrying(attempt, lambda e: is_transient(state.dialect, e))

    # -- backend primitives -----------------------------------------------------------------

    def put(self, value: Any, key: Digest) -> Digest:
        """Write ``value``'s entry under ``key``, replacing any, in one transaction under the
        key's lock: a reader in any process sees the old entry or the new one. The payload is
        written a chunk at a time from the pickle, never copied whole."""
        header, payload = seal_pickle_parts(
            value, key, self.serializer, self._secrets(), self.compression, self._where()
        )
        view = memoryview(payload)
        size = len(view)
        chunks = max(1, -(-size // CHUNK_BYTES))

        state = self.sql._connect()
        compiled = state.compiled
        # Chunks go to the driver as views of the pickle where it takes them (psycopg, sqlite3
        # send them as binary parameters); PyMySQL gets a copy of each chunk.
        chunk: Callable[[int], Any] = (
            (lambda n: view[n * CHUNK_BYTES : (n + 1) * CHUNK_BYTES])
            if state.dialect.binds_buffers
            else (lambda n: bytes(view[n * CHUNK_BYTES : (n + 1) * CHUNK_BYTES]))
        )

        def work(conn: sa.Connection) -> None:
            params = {"key": key}
            with raw_cursor(conn) as cursor:
                compiled(_DELETE_CHUNKS).execute(cursor, params)
                compiled(_DELETE).execute(cursor, params)
                row = {
                    "key": key, "header": header, "size": size, "chunks": chunks,
                    "data": chunk(0), "used": time.time(),
                }
                compiled(_INSERT).execute(cursor, row)
                for n in range(1, chunks):
                    compiled(_INSERT_CHUNK).execute(cursor, {"key": key, "n": n, "data": chunk(n)})

        self._writing(key, work)
        BYTES_WRITTEN.add("bytes", len(header) + size)
        return key

    def get(self, key: Digest) -> Any:
        """Read and check the entry under ``key`` in one snapshot, chunk by chunk into one
        buffer. ``KeyError`` if there is none, :class:`~fleche.errors.CorruptEntryError` if it
        is torn (a chunk missing or of the wrong size), tampered with or cannot be unpickled."""
        where = self._location(key)
        # A value in one row (most): one statement, which sees one snapshot. A larger one: its
        # row and chunks read again in one snapshot, since it may be replaced meanwhile.
        row = self.sql._read_one(_SELECT_SMALL, key)
        if row is None:
            raise KeyError(f"nothing stored under {key}")
        header, size, chunks, payload = row
        if chunks != 1:
            with self.sql._session_scope(Intent.READ) as conn:
                row = conn.execute(_SELECT, {"key": key}).first()
                if row is None:
                    raise KeyError(f"nothing stored under {key}")
                header, size, chunks, payload = row
                if chunks != 1:
                    payload = _joined(conn, key, size, chunks, payload, where)
        if len(payload) != size:
            raise CorruptEntryError(
                key, where, f"torn entry: {len(payload)} bytes of payload where its row says {size}"
            )
        return open_pickle_parts(header, memoryview(payload), key, where, self._secrets())

    def _contains(self, key: Digest) -> bool:
        return self.sql._read_one(_CONTAINS, key) is not None

    def _evict(self, key: Digest) -> None:
        def work(conn: sa.Connection) -> int:
            conn.execute(_DELETE_CHUNKS, {"key": key})
            return conn.execute(_DELETE, {"key": key}).rowcount

        if not self._writing(key, work):
            raise KeyError(f"nothing stored under {key}")

    def list(self) -> Iterable[Digest]:
        """Every stored key, sorted: a snapshot, which other processes may change at once."""
        with self.sql._session_scope(Intent.READ) as conn:
            return [_mk(k) for k in conn.execute(_LIST).scalars()]

    def expand(self, key: Digest | str) -> Digest:
        """Expands a short-hand digest to the full length one, searching the prefix in the
        database (an index range scan); ``KeyError`` if no stored key starts with it and
        :class:`~fleche.errors.AmbiguousDigestError` if several do. A snapshot."""
        text = _check_key_text(key)  # hex only, so no LIKE wildcard or quote can get in
        if len(text) == DIGEST_LENGTH or len(text) < MIN_PREFIX_LENGTH:
            return super().expand(text)
        with self.sql._session_scope(Intent.READ) as conn:
            params = {"low": text, "high": text + "g", "pattern": text + "%"}
            matches = conn.execute(_EXPAND, params).scalars().all()
        return _unique_match(text, matches)

    @contextlib.contextmanager
    def locked(self, key: Digest | str) -> Iterator[Digest]:
        """Hold ``key``'s write lock for a compound section: this process's thread lock, then
        the key's lock in the database (as ``Sql.locked`` takes it), so it excludes the same
        key's writes and sections in every process using the database. Waits at most
        ``lock_timeout`` for both, then raises :class:`~fleche.errors.LockTimeout`."""
        with super().locked(key) as full:
            until = _connections.deadline(self.lock_timeout)
            with self.sql._connect().section(str(full), until):
                yield full

    # -- sizes and uses ---------------------------------------------------------------------

    def usage(self) -> dict[Digest, EntryUsage]:
        """Every stored value with the bytes of its entry (header and payload) and when it was
        saved or last touched: one query in one snapshot."""
        with self.sql._session_scope(Intent.READ) as conn:
            return {_mk(k): EntryUsage(int(n), float(u)) for k, n, u in conn.execute(_USAGE)}

    def volume(self) -> int:
        """Bytes of the stored entries (headers and payloads) in their rows; the database's
        own overhead (indexes, free pages) is in the call storage's ``volume``, which reports
        the whole database. A snapshot."""
        with self.sql._session_scope(Intent.READ) as conn:
            return int(conn.execute(_VOLUME).scalar() or 0)

    def touch(self, keys: Iterable[Digest | str], when: float | None = None) -> None:
        """Record that the values among ``keys`` were used at ``when`` (default now), where
        they were used earlier: one write transaction per 500 keys, taking no key lock (no
        entry changes), retried after a conflict like every write."""
        full = [str(k) for k in self._full_keys(keys)]
        when = time.time() if when is None else when
        state = self.sql._connect()
        for start in range(0, len(full), _BATCH):
            params = {"keys": full[start : start + _BATCH], "when": when}

            def attempt(params: dict[str, Any] = params) -> None:
                with state.transaction(Intent.WRITE) as conn:
                    conn.execute(_TOUCH, params)

            retrying(attempt, lambda e: is_transient(state.dialect, e))

    def close(self) -> None:
        """Release this process's connections of the call storage this storage is built on."""
        self.sql.close()


def _joined(
    conn: sa.Connection, key: Digest, size: int, chunks: int, first: bytes, where: str
) -> bytearray:
    """The payload of a value stored in ``chunks`` chunks, read one chunk at a time into one
    buffer of ``size`` bytes."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    position = len(first)
    if position > size:
        raise CorruptEntryError(key, where, f"torn entry: its first chunk is longer than {size} bytes")
    view[:position] = first
    expected = 1
    with conn.execute(_SELECT_CHUNKS, {"key": key}) as rows:  # closed (drained) on a break
        for n, data in rows:
            end = position + len(data)
            if n != expected or end > size:
                break
            view[position:end] = data
            position, expected = end, expected + 1
    if expected != chunks or position != size:
        raise CorruptEntryError(
            key, where,
            f"torn entry: {position} of {size} bytes in {expected} of {chunks} chunks",
        )
    return buffer


@dataclass(frozen=True)
class SqlValues(PerKeyLockMixin, DestructuringMixin, ValueMixin, SqlValueBackend):
    """A destructuring value storage in a SQL database, safe to share between threads,
    processes and hosts: ``SqlValues(Sql(url))``, or ``SqlValues(url)``.

    >>> import tempfile
    >>> from fleche.caches import Cache
    >>> tmp = tempfile.TemporaryDirectory()
    >>> calls = Sql(tmp.name + "/store.sqlite")
    >>> values = SqlValues(calls)
    >>> values.load(values.save({"a": [1, 2]}))
    {'a': [1, 2]}
    >>> cache = Cache(values, calls)  # a call's values and record commit together
    >>> calls.engine.dispose(); tmp.cleanup()
    """
