"""The ``Sql`` call storage: call records in SQLite, PostgreSQL or MariaDB/MySQL.

Every host that can reach the database shares the records, so this is the call storage for a
cluster. Calls, their arguments and their metadata sections live in three tables
(:mod:`fleche.storage.sql.schema`); queries run in the database. Needs the ``sql`` extra
(``pip install "fleche[sql]"``).

Writes are upserts inside one transaction per record: a reader in any process sees the old
record or the new one, never a gap. Each calls row also holds its whole record (arguments,
metadata, inline values), written in that transaction, so a load is one row read by one
statement, which sees one snapshot in every supported database and so never half of a
replacement. Reads of several statements (``list``, ``query`` batches, an explicit
``_session_scope``) run in one snapshot (``REPEATABLE READ`` on servers, a read transaction in
SQLite's WAL mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import URL

from ...call import Call, DigestedCall, QueryCall
from ...counters import BYTES_WRITTEN
from ...digest import DIGEST_LENGTH, MIN_PREFIX_LENGTH, Digest, _mk
from ...errors import DatabaseError, SaveError
from ..base import (
    CallStorage,
    EntryUsage,
    Intent,
    ValueStorage,
    _check_key_text,
    _unique_match,
)
from ..envelope import as_secrets, environment_secrets
from ..thread_safe import PerKeyLockMixin
from . import connections as _connections
from . import queries as _queries
from . import statements as _statements
from . import usage as _usage
from .connections import Connections, is_transient, reason, retrying, safe_url
from .records import (
    check_record,
    dump_inline,
    dump_json,
    dump_record,
    dump_version,
    load_inline,
    load_record,
    load_version,
    recorded_start,
)
from .schema import calls

__all__ = ["Sql"]

T = TypeVar("T")

_CHUNK = 500
"""Keys per ``IN (...)`` when loading many calls at once."""


def _rebuild(cls: type, settings: dict[str, Any]) -> Sql:
    return cls(**settings)


@dataclass(frozen=True)
class Sql(PerKeyLockMixin, CallStorage):
    """SQLAlchemy-backed CallStorage with JSON metadata and DB-backed expand().

    ``url`` is ``None`` for a SQLite file under the user's cache directory, a plain path for a
    SQLite file there, or any SQLAlchemy URL (``postgresql+psycopg://...``,
    ``mysql+pymysql://...``). SQLite files run in WAL mode with a busy timeout; keep them on a
    local disk and use a server database to share records between hosts.

    ``engine`` and ``session`` (a factory of connections, ``session(intent)``) are created on
    first use in each process;
    a pickled ``Sql`` carries its settings only and connects again where it is unpickled, and a
    forked child drops the connections it inherited. Two ``Sql`` with the same settings are
    equal.

    Metadata sections must be dicts of JSON values (dict with str keys, list, str, int, finite
    float, bool, None) without NUL characters, so that a loaded record equals the saved one.

    A record's ``inline`` values (small arguments and results a cache keeps in the record,
    see ``keeps_inline_values``) are pickled into its row, in the envelope pickle files use
    (:mod:`fleche.storage.envelope`): a damaged BLOB raises
    :class:`~fleche.errors.CorruptEntryError` before anything is unpickled. Unpickling runs
    code, so whoever can write the tables could run code in every process loading from them:
    give ``secret_key`` (bytes, str, or several to rotate keys: values are signed with the first
    and accepted with any), or set ``FLECHE_SECRET_KEY`` in every process, and inline values
    that are unsigned, tampered with or moved from another row raise
    :class:`~fleche.errors.SignatureError` unread. A key given as a field travels inside pickled
    copies of the storage; the environment variable does not.

    ``echo`` logs the statements SQLAlchemy runs; the hot paths (single-row reads by key, the
    writes of a record or a value) run compiled statements on the bare driver and are not logged.

    ``lock_timeout`` (seconds, ``None`` for ever) bounds how long a write or a ``locked``
    section waits for the key's lock, thread lock included, before raising
    :class:`~fleche.errors.LockTimeout`.

    >>> import tempfile
    >>> from fleche.call import Call, QueryCall
    >>> tmp = tempfile.TemporaryDirectory()
    >>> calls = Sql(tmp.name + "/calls.sqlite")
    >>> key = calls.save(Call("area", {"r": 2}, metadata={"run": {"host": "a"}}, result=12.6))
    >>> calls.load(key[:8]).metadata
    {'run': {'host': 'a'}}
    >>> [c.name for c in calls.query(QueryCall(metadata={"run": {"host": "a"}}))]
    ['area']
    >>> calls.engine.dispose(); tmp.cleanup()
    """

    keeps_inline_values: ClassVar[bool] = True
    _atomic_writes: ClassVar[bool] = True  # every write is one transaction: reads need no lock

    url: str | None = None
    echo: bool = False
    lock_timeout: float | None = 1.0
    secret_key: bytes | str | Sequence[bytes | str] | None = field(default=None, repr=False)
    engine: Any = field(default=None, init=False, compare=False, repr=False)
    session: Any = field(default=None, init=False, compare=False, repr=False)
    _local: threading.local | None = field(default=None, init=False, compare=False, repr=False)
    _connections: Connections | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.url, os.PathLike) or (
            isinstance(self.url, str) and "://" not in self.url
        ):
            # A plain path: make it absolute now, so a copy unpickled elsewhere opens the same file.
            object.__setattr__(self, "url", str(Path(self.url).expanduser().absolute()))
        elif self.url is not None and not isinstance(self.url, str):
            raise TypeError(f"Sql url must be a str, a path or None, got {self.url!r}")
        timeout = self.lock_timeout
        if timeout is not None and not (
            type(timeout) in (int, float) and math.isfinite(timeout) and timeout >= 0
        ):
            raise ValueError(f"lock_timeout must be a number >= 0 or None, got {timeout!r}")
        object.__setattr__(self, "secret_key", as_secrets(self.secret_key) or None)

    def _secrets(self) -> tuple[bytes, ...]:
        """Keys to sign inline values with (the first) and to accept (any); empty: unsigned."""
        return self.secret_key or environment_secrets()  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(url={safe_url(self.url)!r}, echo={self.echo!r}, "
            f"lock_timeout={self.lock_timeout!r})"
        )

    def __hash__(self) -> int:
        return hash((type(self), self.url, self.echo, self.lock_timeout))

    def __reduce__(self) -> tuple[Any, ...]:
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return (_rebuild, (type(self), settings))

    # -- connections ------------------------------------------------------------------------

    def _connect(self) -> Connections:
        """This process's connections to the database; made, and the tables checked, on first
        use in each process."""
        state = self._connections
        if state is not None and state.pid == os.getpid():
            return state
        with _connections.setup_lock:
            state = self._connections
            if state is not None and state.pid == os.getpid():
                return state
            if self.engine is not None:
                # Inherited through fork: leave the parent's connections alone, open our own.
                self.engine.dispose(close=False)
            state = _connections.connect(self.url, self.echo)
            object.__setattr__(self, "engine", state.engine)
            object.__setattr__(self, "session", state.open)
            object.__setattr__(self, "_local", state.local)
            object.__setattr__(self, "_connections", state)
            return state

    def close(self) -> None:
        """Close this process's idle connections to the database (its pool and its read
        connections); operations running in other threads keep theirs. The next operation
        connects again; other handles and processes are not affected."""
        state = self._connections
        if state is not None and state.pid == os.getpid():
            state.close()

    def _sqlalchemy_url(self) -> URL:
        """The SQLAlchemy URL of this storage's database."""
        return _connections.sqlalchemy_url(self.url)

    def _session_scope(
        self, intent: Intent, key: str | None = None
    ) -> contextlib.AbstractContextManager[sa.Connection]:
        """The connection of the operation running in this thread, or a new one in a transaction
        (see ``Connections.transaction``): nested operations share the outermost connection, so
        one operation is one transaction, and a read transaction is one snapshot. A new write
        transaction for ``key`` waits up to ``lock_timeout`` for the key's lock."""
        return self._connect().transaction(intent, key, _connections.deadline(self.lock_timeout))

    def _read_one(self, statement: Any, key: str) -> Any:
        """The first row the one-row SELECT by ``key`` ``statement`` finds, read without
        SQLAlchemy's execution layer (see ``Connections.read_one``)."""
        state = self._connections
        if state is None or state.pid != os.getpid():
            state = self._connect()
        return state.read_one(statement, key)

    def _operation_context(
        self, key: Digest | str, *, intent: Intent = Intent.WRITE
    ) -> contextlib.AbstractContextManager[None]:
        # A read is one statement (see _read_one) and opens nothing here. A write holds the
        # per-key thread lock, then the key's lock in the database, then one transaction: threads
        # waiting for the key hold no connection, and the database's write lock is held for the
        # write only. One deadline covers both locks.
        if intent is Intent.READ:
            return super()._operation_context(key, intent=intent)
        return self._write_context(key)

    @contextlib.contextmanager
    def _write_context(self, key: Digest | str) -> Iterator[None]:
        until = _connections.deadline(self.lock_timeout)
        with super()._operation_context(key, intent=Intent.WRITE):
            with self._connect().transaction(Intent.WRITE, str(key), until):
                yield

    @contextlib.contextmanager
    def locked(self, key: Digest | str) -> Iterator[Digest]:
        """Hold ``key``'s write lock for a compound section (read-modify-write, compute-once).

        Yields the full key. Excludes the same key's writes and ``locked`` sections in every
        thread and process using this database: a thread lock, then the key's lock in the
        database (an advisory lock on PostgreSQL, ``GET_LOCK`` on MariaDB, a lock file next to a
        SQLite database), held with no transaction open, so writers of other keys never wait
        for a long section. Waits at most ``lock_timeout`` in total for both, then raises
        :class:`~fleche.errors.LockTimeout`. Reentrant for the holding thread, whose saves and
        evictions of ``key`` inside take no lock again. On a read-only SQLite database it
        excludes this process's threads only (nothing can write there anyway).
        """
        key = self._normalize_key(key)
        until = _connections.deadline(self.lock_timeout)
        with super()._operation_context(key, intent=Intent.WRITE):
            with self._connect().section(str(key), until):
                yield key

    def _in_operation(self) -> bool:
        state = self._connections
        return state is not None and state.pid == os.getpid() and state.current() is not None

    # -- primitives -------------------------------------------------------------------------

    def _persist_call(self, row: dict[str, Any], call: DigestedCall, key: Digest) -> Digest:
        """Write ``call`` under ``key`` in the current transaction, replacing an earlier record."""
        state = self._connect()
        argument_rows = [
            {"call_key": key, "position": i, "name": name, "value": str(value)}
            for i, (name, value) in enumerate(call.arguments.items())
        ]
        metadata_rows = [
            {"call_key": key, "position": i, "section": section, "data": dump_json(entries)}
            for i, (section, entries) in enumerate((call.metadata or {}).items())
        ]
        params = {"key": key}
        compiled = state.compiled
        with self._session_scope(Intent.WRITE) as conn, _statements.raw_cursor(conn) as cursor:
            # The upsert locks the calls row first, so concurrent saves of one key queue up here
            # and each replaces the rows below as a whole.
            compiled(state.upsert).execute(cursor, row)
            compiled(_statements.DELETE_ARGUMENTS).execute(cursor, params)
            compiled(_statements.DELETE_METADATA).execute(cursor, params)
            if argument_rows:
                compiled(_statements.INSERT_ARGUMENTS).executemany(cursor, argument_rows)
            if metadata_rows:
                compiled(_statements.INSERT_METADATA).executemany(cursor, metadata_rows)
        BYTES_WRITTEN.add("bytes", len(row.get("record") or "") + len(row.get("inline") or b""))
        return key

    def _where(self) -> str:
        """Where records live, as errors name it: the SQLite file or the masked URL, and the
        table."""
        return f"{safe_url(self.url)} table fleche_calls"

    def _decode(self, row: Any) -> DigestedCall:
        """The record in a row of ``statements.RECORD_COLUMNS``."""
        key, name, module, version, version_type, code_digest, result, text, blob = row
        where = self._where()
        args, metadata = load_record(text, key, where)
        return DigestedCall(
            name=name,
            arguments=args,
            metadata=metadata,
            module=module,
            version=load_version(version, version_type, key, where),
            code_digest=code_digest,
            result=None if result is None else _mk(result),
            inline=None if blob is None else load_inline(blob, key, where, self._secrets()),
        )

    def _fetch_call(self, key: Digest) -> DigestedCall:
        """The record stored under the full key ``key``; ``KeyError`` if there is none."""
        row = self._read_one(_statements.SELECT_RECORD, key)
        if row is None:
            raise KeyError(f"nothing stored under {key}")
        return self._decode(row)

    def _fetch_many(self, conn: sa.Connection, keys: list[str]) -> list[DigestedCall]:
        """The records stored under ``keys`` (missing ones left out), read in one statement."""
        rows = conn.execute(_statements.SELECT_RECORDS, {"keys": keys}).all()
        return [self._decode(row) for row in rows]

    def _contains(self, key: Digest) -> bool:
        return self._read_one(_statements.CONTAINS, key) is not None

    def _evict(self, key: Digest) -> None:
        with self._session_scope(Intent.WRITE) as conn:
            # Arguments and metadata go with it (ON DELETE CASCADE).
            deleted = conn.execute(_statements.DELETE_CALL, {"key": key}).rowcount
        if not deleted:
            raise KeyError(f"nothing stored under {key}")

    # -- public operations ------------------------------------------------------------------

    def list(self) -> Iterable[Digest]:
        """Every stored key, sorted: a snapshot of one moment, which other processes may change
        at once."""
        with self._session_scope(Intent.READ) as conn:
            return [_mk(k) for k in conn.execute(_statements.LIST_KEYS).scalars()]

    def shrink(self, key: Digest | str, /, *keys: Digest | str) -> Any:
        """Find the shortest substring(s) that unambiguously reference each key (see
        ``KeyManagement.shrink``): three indexed lookups per key (itself and its neighbours in
        key order) in one snapshot instead of a listing, so ``fleche ls`` stays flat as the
        table grows. ``KeyError`` for a key that is not stored; a key saved later may make a
        returned prefix ambiguous."""
        full = [self._normalize_key(k) for k in (key, *keys)]
        shrunk = []
        with self._session_scope(Intent.READ) as conn:
            for k in full:
                if conn.execute(_statements.CONTAINS, {"key": k}).first() is None:
                    raise KeyError(f"nothing stored under {k}: only stored keys can be shrunk")
                near = [
                    row[0]
                    for statement in (_statements.KEY_BEFORE, _statements.KEY_AFTER)
                    for row in conn.execute(statement, {"key": k})
                ]
                shrunk.append(self._shrink_one(k, sorted([*near, k])))
        return tuple(shrunk) if keys else shrunk[0]

    def newest(self, limit: int) -> list[Digest]:
        """The keys of the ``limit`` calls started last (their ``runtime`` metadata's
        ``start``), newest first; calls without a start come last, in key order. Two index scans
        with ``LIMIT`` (of the ``started`` column) in one snapshot, no record decoded, so the
        cost does not grow with the number of stored calls and a damaged record still counts."""
        if limit < 0:
            raise ValueError(f"limit must be 0 or more, got {limit}")
        if limit == 0:
            return []
        with self._session_scope(Intent.READ) as conn:
            keys = list(conn.execute(_statements.NEWEST_STARTED, {"limit": limit}).scalars())
            if len(keys) < limit:
                more = {"limit": limit - len(keys)}
                keys += conn.execute(_statements.NEWEST_UNDATED, more).scalars()
        return [_mk(k) for k in keys]

    def expand(self, key: Digest | str) -> Digest:
        """Expands a short-hand digest to the full length one.

        The prefix search runs in the database (an index range scan, not a listing). Raises
        ``KeyError`` if no stored key starts with the prefix and :class:`AmbiguousDigestError`
        if several do; a snapshot that concurrent saves may make ambiguous.
        """
        text = _check_key_text(key)  # hex only, so no LIKE wildcard or quote can get in
        if len(text) == DIGEST_LENGTH or len(text) < MIN_PREFIX_LENGTH:
            return super().expand(text)
        with self._operation_context(text, intent=Intent.READ):
            with self._session_scope(Intent.READ) as conn:
                params = {"low": text, "high": text + "g", "pattern": text + "%"}
                matches = conn.execute(_statements.EXPAND, params).scalars().all()
        return _unique_match(text, matches)

    def contains_many(self, keys: Iterable[Digest | str]) -> set[Digest]:
        """The full keys of those among ``keys`` (full or short) that are stored.

        One query per batch of 500 keys, full keys and prefixes alike, each a snapshot that
        other processes may change at once. A short key no stored key starts with is left out;
        one that several start with raises :class:`AmbiguousDigestError`, like :meth:`expand`.
        """
        texts = [_check_key_text(k) for k in keys]  # hex only: nothing can get into the SQL
        for text in texts:
            if len(text) < MIN_PREFIX_LENGTH:
                raise ValueError(
                    f"short digest {text!r} is too short: give at least {MIN_PREFIX_LENGTH} "
                    "characters"
                )
        found: set[Digest] = set()
        for start in range(0, len(texts), _CHUNK):
            batch = texts[start : start + _CHUNK]
            with self._session_scope(Intent.READ) as conn:
                stored = set(conn.execute(_queries.keys_among(batch)).scalars())
            for text in batch:
                if len(text) == DIGEST_LENGTH:
                    if text in stored:
                        found.add(_mk(text))
                    continue
                matches = [k for k in stored if k.startswith(text)]
                if matches:
                    found.add(_unique_match(text, matches))
        return found

    def save(self, call: DigestedCall | Call) -> Digest:
        """Store the record under its lookup key, replacing an earlier one, and return the key.

        One transaction, under the key's lock: a reader in any thread or process sees the old
        record or the new one, never neither and never a mix. Concurrent saves of the same key
        from many processes succeed (the last one wins); deadlocks and serialization failures
        are retried. Raises :class:`~fleche.errors.LockTimeout` if the key stays locked longer
        than ``lock_timeout``, and :class:`SaveError`, with nothing written, for a record the
        database cannot hold exactly (metadata that is not JSON, an inline value that does not
        pickle) or a database opened read-only.
        """
        if not isinstance(call, Call):
            raise TypeError(f"a call storage saves Call records, got {type(call).__name__}")
        record = call.digest()
        check_record(record)
        key = record.to_lookup_key()
        try:
            inline = dump_inline(record, key, self._secrets(), self._where())
        except SaveError as e:
            raise SaveError(f"cannot save a call of {record.name!r}: {e}") from e.__cause__
        version, version_type = dump_version(record.version)
        row = {
            "key": key,
            "name": record.name,
            "module": record.module,
            "version": version,
            "version_type": version_type,
            "code_digest": record.code_digest,
            "result": None if record.result is None else str(record.result),
            "record": dump_record(record),
            "inline": inline,
            "started": recorded_start(record.metadata),
        }
        dialect = self._connect().dialect
        try:
            dialect.check_writable(f"save a call of {record.name!r}")
        except DatabaseError as e:
            raise SaveError(str(e)) from e
        self._retrying(key, lambda: self._persist_call(row, record, key))
        return key

    def save_together(self, key: Digest, values: ValueStorage, write: Callable[[], T]) -> T:
        """Run ``write`` (a call's values, then its record) in one transaction under the call
        key's lock when ``values`` keeps its values in this storage's database through this
        very storage (an :class:`~fleche.storage.sql.SqlValues` built on it, as
        ``fleche.open`` makes them): the values and the record commit together or not at all,
        seen by every process at once, and ``write`` runs again after a transient conflict
        (two processes inserting the same new value). With any other value storage, as
        ``CallStorage.save_together``: ``write`` once, each write its own transaction.
        """
        from .values import SqlValueBackend  # builds on this module

        if not (isinstance(values, SqlValueBackend) and values.sql is self):
            return write()
        return self._retrying(key, write)

    def counts_volume_of(self, values: ValueStorage) -> bool:
        """Whether ``values`` keeps its values in this storage's database (an
        :class:`~fleche.storage.sql.SqlValues` on an equal ``Sql``), which :meth:`volume`
        reports whole."""
        from .values import SqlValueBackend  # builds on this module

        return isinstance(values, SqlValueBackend) and values.sql == self

    def evict(self, key: Digest | str) -> None:
        """Remove the record under ``key``; ``KeyError`` if there is none.

        One transaction under the key's lock, like :meth:`save`; arguments and metadata go with
        the record. :class:`~fleche.errors.DatabaseError` on a database opened read-only.
        """
        key = self._normalize_key(key)
        self._connect().dialect.check_writable(f"evict {key}")
        self._retrying(key, lambda: self._evict(key))

    def load(self, key: Digest | str) -> DigestedCall:
        """Return the record stored under ``key`` (full or short) with its inline values;
        ``KeyError`` if absent.

        One row read in one statement, so a concurrent save in any process is seen whole or not
        at all.
        """
        key = self._normalize_key(key)
        with self._operation_context(key, intent=Intent.READ):
            return self._fetch_call(key)

    def _retrying(self, key: Digest, work: Any) -> Any:
        """Run ``work`` in a write operation on ``key``, again after a transient conflict
        (unless this thread is inside an operation already, whose transaction it would break)."""
        dialect = self._connect().dialect

        def attempt() -> Any:
            with self._operation_context(key):
                return work()

        try:
            return retrying(
                attempt, lambda e: not self._in_operation() and is_transient(dialect, e)
            )
        except (exc.DataError, exc.IntegrityError) as e:
            raise SaveError(f"could not write {key}: {reason(e)}") from e

    # -- sizes and uses ---------------------------------------------------------------------

    def usage(self) -> dict[Digest, EntryUsage]:
        """Every stored call with the bytes of its record and inline values (the side tables
        of arguments and metadata, and indexes, are not counted) and when it was last touched
        or started (its runtime metadata), whichever is later, else 0.0; one query in one
        snapshot, which reads every record (see :mod:`fleche.storage.sql.usage`)."""
        with self._session_scope(Intent.READ) as conn:
            return _usage.uses(conn, f"{safe_url(self.url)} table fleche_calls")

    def touch(self, keys: Iterable[Digest | str], when: float | None = None) -> None:
        """Record the use of the stored calls among ``keys`` in ``fleche_usage``: one write
        transaction (two statements per 500 keys), which takes no key lock (no record
        changes) and is retried after a conflict like every write.
        :class:`~fleche.errors.DatabaseError` on a database opened read-only."""
        full = [str(k) for k in self._full_keys(keys)]
        if not full:
            return
        when = time.time() if when is None else when
        state = self._connect()
        state.dialect.check_writable("record uses")
        _usage.create_usage_table(state.write, lambda e: is_transient(state.dialect, e))

        def attempt() -> None:
            with state.write.begin() as conn:
                _usage.record_uses(conn, full, when)

        retrying(attempt, lambda e: is_transient(state.dialect, e))

    def volume(self) -> int | None:
        """Bytes the database takes: a SQLite file with its journal files; on PostgreSQL and
        MariaDB/MySQL what the server reports for the fleche tables (space freed by evictions
        stays with the tables until the server gives it back, e.g. after ``VACUUM FULL``)."""
        with self._session_scope(Intent.READ) as conn:
            return self._connect().dialect.volume(conn)

    # -- queries ----------------------------------------------------------------------------

    def _normalize_value(self, v: Any) -> str:
        """Return the stored form used in SQL for argument/result matching.

        The generic query compares ``digest(template_value) == digest(stored_value)``; stored
        values are digests and ``digest(Digest(x)) == x``, so the stored form of a template
        value is its digest, whether it was given as a value or as a :class:`Digest`.
        """
        return _queries.stored_form(v)

    def _build_call_conditions(self, template: QueryCall) -> list[Any]:
        """SQL conditions over ``fleche_calls`` that every call matching ``template`` fulfils
        (see :func:`fleche.storage.sql.queries.call_conditions`)."""
        return _queries.call_conditions(template, self._connect().dialect)

    def query(self, template: QueryCall | Call) -> Iterable[DigestedCall]:
        """Find cached calls matching a template using SQL-side filtering.

        ``template`` is a :class:`QueryCall`, or a :class:`Call` (digested or not) standing for
        the equivalent ``QueryCall`` (same fields; its ``None`` fields are wildcards too).
        Semantics and results equal the generic ``CallMixin.query``: ``None`` fields are
        wildcards; arguments and result match by digest; ``template.metadata`` maps section
        names to entries that must be equal (an empty dict asks only that the section exists).
        Conditions SQL can decide exactly or conservatively run in the database (see
        :meth:`_build_call_conditions`); every candidate is then checked with
        :meth:`QueryCall.matches`.

        The matching keys are selected in one snapshot, then loaded in batches of 500 records,
        each batch in its own read transaction; calls saved or evicted meanwhile may or may not
        be seen, and a record replaced meanwhile is yielded as it is when loaded.

        :param template: A Call used as a template. None-valued fields are wildcards.
        :returns: an iterator over the matching calls, with their decoded metadata.
        """
        template = _queries.as_template(template)
        conditions = self._build_call_conditions(template)
        with self._session_scope(Intent.READ) as conn:
            keys = conn.execute(sa.select(calls.c.key).where(*conditions)).scalars().all()
        for start in range(0, len(keys), _CHUNK):
            with self._session_scope(Intent.READ) as conn:
                batch = self._fetch_many(conn, keys[start : start + _CHUNK])
            for call in batch:
                if template.matches(call):
                    yield call

