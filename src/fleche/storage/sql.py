"""A call storage in an SQL database (SQLite, PostgreSQL, MariaDB/MySQL) via SQLAlchemy 2.

Every host that can reach the database shares the records, so this is the call storage for a
cluster. Calls, their arguments and their metadata sections live in three tables
(:mod:`fleche.storage._sql_schema`); queries run in the database. Needs the ``sql`` extra
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
import functools
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import platformdirs
import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, make_url

from ..counters import BYTES_WRITTEN
from ..call import Call, DigestedCall, QueryCall
from ..digest import DIGEST_LENGTH, MIN_PREFIX_LENGTH, Digest, _mk, digest
from ..errors import DatabaseError, SaveError
from . import _sql_engine
from . import _sql_statements as _statements
from ._sql_engine import _is_transient, _reason, _safe_url, create_engine
from ._sql_records import (
    _check_record,
    _dump,
    _storable,
    dump_inline,
    dump_record,
    load_inline,
    load_record,
)
from ._sql_schema import SCHEMA_VERSION, arguments, calls, ensure_schema, metadata_sections
from .base import CallStorage, Intent, _check_key_text, _unique_match
from .thread_safe import PerKeyLockMixin

__all__ = ["SCHEMA_VERSION", "Sql"]

_CHUNK = 500
"""Keys per ``IN (...)`` when loading many calls at once."""

_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_.\-]+")
"""Metadata entry names that need no quoting in a SQLite or MySQL JSON path."""


# -- the storage ----------------------------------------------------------------------------------


_READS = {"record": _statements.SELECT_RECORD, "contains": _statements.CONTAINS}
"""The reads of one row by key that run without SQLAlchemy's execution layer on the hot path."""


def _rebuild(cls: type, settings: dict[str, Any]) -> Sql:
    return cls(**settings)


class _Binds(NamedTuple):
    """Where each kind of operation runs (engines, some with execution options)."""

    snapshot: Any
    """Read transactions of several statements: one snapshot."""
    write: Any
    """Write transactions (``BEGIN IMMEDIATE`` in SQLite, READ COMMITTED on servers)."""
    reads: dict[str, _statements.KeyRead]
    """Reads of one row by key outside any operation, compiled for this database."""
    key_lock: tuple[Any, Any] | None
    """Take and release the database's lock on a key (``_statements.key_lock``)."""


def _open(binds: _Binds, intent: Intent) -> sa.Connection:
    """A new connection for an operation of kind ``intent`` (``Sql.session``)."""
    return (binds.snapshot if intent is Intent.READ else binds.write).connect()


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
    see ``keeps_inline_values``) are pickled into its row and unpickled on load. Like pickle
    files, this trusts the database: whoever can write its tables can run code in every process
    loading from it. Only BLOBs carrying this storage's format prefix are unpickled.

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
    engine: Any = field(default=None, init=False, compare=False, repr=False)
    session: Any = field(default=None, init=False, compare=False, repr=False)
    _local: threading.local | None = field(default=None, init=False, compare=False, repr=False)
    _binds: _Binds | None = field(default=None, init=False, compare=False, repr=False)
    _pid: int | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.url, os.PathLike) or (
            isinstance(self.url, str) and "://" not in self.url
        ):
            # A plain path: make it absolute now, so a copy unpickled elsewhere opens the same file.
            object.__setattr__(self, "url", str(Path(self.url).expanduser().absolute()))
        elif self.url is not None and not isinstance(self.url, str):
            raise TypeError(f"Sql url must be a str, a path or None, got {self.url!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={_safe_url(self.url)!r}, echo={self.echo!r})"

    def __hash__(self) -> int:
        return hash((type(self), self.url, self.echo))

    def __reduce__(self) -> tuple[Any, ...]:
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return (_rebuild, (type(self), settings))

    # -- connections ------------------------------------------------------------------------

    def _connect(self) -> _Binds:
        """The engines for this process's operations; creates them on first use."""
        binds, pid = self._binds, os.getpid()
        if binds is not None and self._pid == pid:
            return binds
        with _sql_engine.setup_lock:
            if self._binds is not None and self._pid == pid:
                return self._binds
            if self.engine is not None:
                # Inherited through fork: leave the parent's connections alone, open our own.
                self.engine.dispose(close=False)
            url = self._sqlalchemy_url()
            engine = create_engine(url, self.echo)
            try:
                ensure_schema(engine, url)
            except BaseException:
                engine.dispose()
                raise
            if engine.dialect.name == "sqlite":
                snapshot = engine  # a deferred BEGIN: one WAL read snapshot
                write = engine.execution_options(fleche_immediate=True)
            else:
                snapshot = engine.execution_options(isolation_level="REPEATABLE READ")
                write = engine  # READ COMMITTED, see _sql_engine.create_engine
            reads = {name: _statements.KeyRead(s, engine.dialect) for name, s in _READS.items()}
            binds = _Binds(snapshot, write, reads, _statements.key_lock(engine.dialect.name))
            object.__setattr__(self, "engine", engine)
            object.__setattr__(self, "session", functools.partial(_open, binds))
            object.__setattr__(self, "_local", threading.local())
            object.__setattr__(self, "_binds", binds)
            object.__setattr__(self, "_pid", pid)
            return binds

    def _sqlalchemy_url(self) -> URL:
        if self.url is None:
            path = Path(platformdirs.user_cache_dir("fleche")) / "calls.sqlite"
        elif "://" not in self.url:
            path = Path(self.url)
        else:
            try:
                url = make_url(self.url)
            except exc.ArgumentError as e:
                raise DatabaseError(_safe_url(self.url), f"not a valid database URL ({e})") from None
            if url.get_backend_name() in ("mysql", "mariadb") and "charset" not in url.query:
                url = url.update_query_dict({"charset": "utf8mb4"})
            return url
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatabaseError(str(path), f"cannot create its directory: {e}") from None
        return URL.create("sqlite+pysqlite", database=str(path))

    @contextlib.contextmanager
    def _session_scope(self, intent: Intent, key: str | None = None) -> Iterator[sa.Connection]:
        """The connection of the operation running in this thread, or a new one in a transaction.

        Nested operations (``locked`` around ``save``, ``load`` calling ``expand``) share the
        outermost connection, so one operation is one transaction; a read transaction is one
        snapshot (``REPEATABLE READ`` on servers). A new write transaction for ``key`` first
        takes the database's lock on it (see ``_statements.key_lock``), so write operations on
        one key, ``locked`` sections included, exclude each other in every process.
        """
        binds = self._connect()
        local = self._local
        current = getattr(local, "conn", None)
        if current is not None:
            yield current
            return
        lock = None if key is None or intent is not Intent.WRITE else binds.key_lock
        with self.session(intent) as conn:
            local.conn = conn
            try:
                with conn.begin():
                    if lock is not None:
                        taken = conn.execute(lock[0], _statements.key_lock_params(key)).scalar()
                        if lock[1] is not None and taken != 1:  # GET_LOCK: NULL on an error
                            raise DatabaseError(_safe_url(self.url), f"GET_LOCK for {key} failed")
                    yield conn
            finally:
                local.conn = None
                if lock is not None and lock[1] is not None and not conn.invalidated:
                    try:
                        conn.execute(lock[1], _statements.key_lock_params(key))
                        conn.rollback()
                    except exc.DBAPIError:
                        conn.invalidate()  # closing the connection drops its GET_LOCK locks

    def _read_one(self, read: str, key: str) -> Any:
        """The first row the single-key read ``read`` (``"record"`` or ``"contains"``) finds.

        A single statement reads one consistent snapshot in SQLite, PostgreSQL and MariaDB, so
        outside an operation it runs on its own, without an explicit transaction (autocommit in
        SQLite, READ COMMITTED on servers); inside one it uses the operation's connection.
        """
        binds = self._binds
        if binds is None or self._pid != os.getpid():
            binds = self._connect()
        current = getattr(self._local, "conn", None)
        if current is not None:
            return current.execute(_READS[read], {"key": key}).first()
        return binds.reads[read].first(self.engine, key)

    def _operation_context(
        self, key: Digest | str, *, intent: Intent = Intent.WRITE
    ) -> contextlib.AbstractContextManager[None]:
        # A read is one statement (see _read_one) and opens nothing here; a write holds one
        # transaction, taken after the per-key lock so threads waiting for it hold no connection.
        if intent is Intent.READ:
            return super()._operation_context(key, intent=intent)
        return self._write_context(key)

    @contextlib.contextmanager
    def _write_context(self, key: Digest | str) -> Iterator[None]:
        with super()._operation_context(key, intent=Intent.WRITE):
            with self._session_scope(Intent.WRITE, str(key)):
                yield

    def _in_operation(self) -> bool:
        return self._local is not None and getattr(self._local, "conn", None) is not None

    @property
    def _dialect(self) -> str:
        return self._connect().write.dialect.name

    # -- primitives -------------------------------------------------------------------------

    def _persist_call(self, row: dict[str, Any], call: DigestedCall, key: Digest) -> Digest:
        """Write ``call`` under ``key`` in the current transaction, replacing an earlier record."""
        upsert = _statements.upsert(self._dialect)
        if upsert is None:
            raise DatabaseError(_safe_url(self.url), f"the {self._dialect} dialect is not supported")
        argument_rows = [
            {"call_key": key, "position": i, "name": name, "value": str(value)}
            for i, (name, value) in enumerate(call.arguments.items())
        ]
        metadata_rows = [
            {"call_key": key, "position": i, "section": section, "data": _dump(entries)}
            for i, (section, entries) in enumerate((call.metadata or {}).items())
        ]
        params = {"key": key}
        with self._session_scope(Intent.WRITE) as conn:
            # The upsert locks the calls row first, so concurrent saves of one key queue up here
            # and each replaces the rows below as a whole.
            conn.execute(upsert, row)
            conn.execute(_statements.DELETE_ARGUMENTS, params)
            conn.execute(_statements.DELETE_METADATA, params)
            if argument_rows:
                conn.execute(_statements.INSERT_ARGUMENTS, argument_rows)
            if metadata_rows:
                conn.execute(_statements.INSERT_METADATA, metadata_rows)
        BYTES_WRITTEN.add("bytes", len(row.get("record") or "") + len(row.get("inline") or b""))
        return key

    def _decode(self, row: Any) -> DigestedCall:
        """The record in a row of ``_statements.RECORD_COLUMNS``."""
        key, name, module, version, code_digest, result, text, blob = row
        where = f"{_safe_url(self.url)} table fleche_calls"
        args, metadata = load_record(text, key, where)
        return DigestedCall(
            name=name,
            arguments=args,
            metadata=metadata,
            module=module,
            version=version,
            code_digest=code_digest,
            result=None if result is None else _mk(result),
            inline=None if blob is None else load_inline(blob, key, where),
        )

    def _fetch_call(self, key: Digest) -> DigestedCall:
        """The record stored under the full key ``key``; ``KeyError`` if there is none."""
        row = self._read_one("record", key)
        if row is None:
            raise KeyError(f"nothing stored under {key}")
        return self._decode(row)

    def _fetch_many(self, conn: sa.Connection, keys: list[str]) -> list[DigestedCall]:
        """The records stored under ``keys`` (missing ones left out), read in one statement."""
        rows = conn.execute(_statements.SELECT_RECORDS, {"keys": keys}).all()
        return [self._decode(row) for row in rows]

    def _contains(self, key: Digest) -> bool:
        return self._read_one("contains", key) is not None

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

    def save(self, call: DigestedCall | Call) -> Digest:
        """Store the record under its lookup key, replacing an earlier one, and return the key.

        One transaction: a reader in any thread or process sees the old record or the new one,
        never neither and never a mix. Concurrent saves of the same key from many processes
        succeed (the last one wins); deadlocks and serialization failures are retried. Raises
        :class:`SaveError`, with nothing written, for a record the database cannot hold exactly
        (metadata that is not JSON, an inline value that does not pickle).
        """
        if not isinstance(call, Call):
            raise TypeError(f"a call storage saves Call records, got {type(call).__name__}")
        record = call.digest()
        _check_record(record)
        key = record.to_lookup_key()
        try:
            inline = dump_inline(record)
        except SaveError as e:
            raise SaveError(f"cannot save a call of {record.name!r}: {e}") from e.__cause__
        row = {
            "key": key,
            "name": record.name,
            "module": record.module,
            "version": record.version,
            "code_digest": record.code_digest,
            "result": None if record.result is None else str(record.result),
            "record": dump_record(record),
            "inline": inline,
        }
        self._retrying(key, lambda: self._persist_call(row, record, key))
        return key

    def evict(self, key: Digest | str) -> None:
        """Remove the record under ``key``; ``KeyError`` if there is none.

        One transaction; arguments and metadata go with the record. Retried on deadlocks like
        :meth:`save`.
        """
        key = self._normalize_key(key)
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
        """Run ``work`` in a write operation on ``key``, again after a transient conflict."""
        for attempt in range(30):
            try:
                with self._operation_context(key):
                    return work()
            except exc.DBAPIError as e:
                if self._in_operation() or attempt == 29 or not _is_transient(e):
                    if isinstance(e, (exc.DataError, exc.IntegrityError)):
                        raise SaveError(f"could not write {key}: {_reason(e)}") from e
                    raise
            time.sleep(random.uniform(0, min(0.5, 0.002 * 2**attempt)))
        raise AssertionError("unreachable")

    # -- queries ----------------------------------------------------------------------------

    def _normalize_value(self, v: Any) -> str:
        """Return the stored form used in SQL for argument/result matching.

        The generic query compares ``digest(template_value) == digest(stored_value)``; stored
        values are digests and ``digest(Digest(x)) == x``, so the stored form of a template
        value is its digest, whether it was given as a value or as a :class:`Digest`.
        """
        return str(digest(v))

    def _build_call_conditions(self, template: QueryCall) -> list[Any]:
        """SQL conditions over ``fleche_calls`` that every call matching ``template`` fulfils.

        Name, module, version, code digest, result, arguments, metadata sections and scalar
        metadata entries (str, int, float, bool, None) become conditions; anything else is left
        to :meth:`QueryCall.matches`, which :meth:`query` applies to every candidate.
        """
        conditions: list[Any] = []
        for attr in ("name", "module", "version", "code_digest"):
            want = getattr(template, attr)
            if want is None:
                continue
            if type(want) is not str:
                continue  # stored fields are str; leave odd templates to matches()
            conditions.append(calls.c[attr] == want if _storable(want) else sa.false())
        if template.result is not None:
            result = self._normalize_value(template.result)
            if result == digest(None):
                conditions.append(sa.or_(calls.c.result == result, calls.c.result.is_(None)))
            else:
                conditions.append(calls.c.result == result)
        for name, value in (template.arguments or {}).items():
            if type(name) is not str:
                continue
            if not _storable(name):
                conditions.append(sa.false())
                continue
            conditions.append(
                sa.exists().where(
                    arguments.c.call_key == calls.c.key,
                    arguments.c.name == name,
                    arguments.c.value == self._normalize_value(value),
                )
            )
        for section, entries in (template.metadata or {}).items():
            if type(section) is not str:
                continue
            if not _storable(section):
                conditions.append(sa.false())
                continue
            where = [metadata_sections.c.call_key == calls.c.key, metadata_sections.c.section == section]
            for entry, value in (entries or {}).items():
                condition = self._entry_condition(entry, value)
                if condition is not None:
                    where.append(condition)
            conditions.append(sa.exists().where(*where))
        return conditions

    def _entry_condition(self, entry: Any, value: Any) -> Any:
        """SQL for "metadata entry ``entry`` equals ``value``", or None to check it in Python.

        Compares the entry's JSON text as stored with the JSON text of ``value``: all three
        databases return a scalar's text exactly as written, and JSON text tells 1, 1.0, True
        and "1" apart just as digests do.
        """
        if type(entry) is not str or type(value) not in (str, int, float, bool, type(None)):
            return None
        if (type(value) is float and not math.isfinite(value)) or not _storable(entry):
            return sa.false()  # never stored
        if type(value) is str and not _storable(value):
            return sa.false()
        text = json.dumps(value, ensure_ascii=False)
        data = metadata_sections.c.data
        name = self._dialect
        if name == "postgresql":
            fragment = sa.cast(
                sa.cast(data, postgresql.JSON).op("->", return_type=postgresql.JSON)(
                    sa.literal(entry, sa.Text)
                ),
                sa.Text,
            )
        elif _SIMPLE_KEY.fullmatch(entry) is None:
            return None  # JSON path quoting differs between SQLite and MySQL; check in Python
        elif name == "sqlite" and sqlite3.sqlite_version_info >= (3, 38):
            fragment = data.op("->", return_type=sa.Text)(sa.literal(f'$."{entry}"'))
        elif name in ("mysql", "mariadb"):
            # MariaDB compares a JSON value with a string by meaning; the cast compares text.
            fragment = sa.cast(sa.func.json_extract(data, sa.literal(f'$."{entry}"')), sa.String)
        else:
            return None
        return fragment == text

    def query(self, template: QueryCall) -> Iterable[DigestedCall]:
        """Find cached calls matching a template using SQL-side filtering.

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
        conditions = self._build_call_conditions(template)
        with self._session_scope(Intent.READ) as conn:
            keys = conn.execute(sa.select(calls.c.key).where(*conditions)).scalars().all()
        for start in range(0, len(keys), _CHUNK):
            with self._session_scope(Intent.READ) as conn:
                batch = self._fetch_many(conn, keys[start : start + _CHUNK])
            for call in batch:
                if template.matches(call):
                    yield call

