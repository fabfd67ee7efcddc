"""A call storage in an SQL database (SQLite, PostgreSQL, MariaDB/MySQL) via SQLAlchemy 2.

Every host that can reach the database shares the records, so this is the call storage for a
cluster. Calls, their arguments and their metadata sections live in three tables
(:mod:`fleche.storage._sql_schema`); queries run in the database. Needs the ``sql`` extra
(``pip install "fleche[sql]"``).

Writes are upserts inside one transaction per record: a reader in any process sees the old
record or the new one, never a gap. Reads of one record run in one snapshot (``REPEATABLE READ``
on servers, a read transaction in SQLite's WAL mode), so they never see half of a replacement.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from typing import Any

import platformdirs
import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from ..call import Call, DigestedCall, QueryCall
from ..digest import DIGEST_LENGTH, MIN_PREFIX_LENGTH, Digest, _mk, digest
from ..errors import CorruptEntryError, DatabaseError, SaveError
from . import _sql_engine
from ._sql_engine import _is_transient, _safe_url, create_engine
from ._sql_records import _check_record, _dump, _storable
from ._sql_schema import SCHEMA_VERSION, arguments, calls, ensure_schema, metadata_sections
from .base import CallStorage, Intent, _check_key_text, _unique_match
from .thread_safe import PerKeyLockMixin

__all__ = ["SCHEMA_VERSION", "Sql"]

_CHUNK = 500
"""Keys per ``IN (...)`` when loading many calls at once."""

_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_.\-]+")
"""Metadata entry names that need no quoting in a SQLite or MySQL JSON path."""


# -- the storage ----------------------------------------------------------------------------------


def _rebuild(cls: type, settings: dict[str, Any]) -> Sql:
    return cls(**settings)


@dataclass(frozen=True)
class Sql(PerKeyLockMixin, CallStorage):
    """SQLAlchemy-backed CallStorage with JSON metadata and DB-backed expand().

    ``url`` is ``None`` for a SQLite file under the user's cache directory, a plain path for a
    SQLite file there, or any SQLAlchemy URL (``postgresql+psycopg://...``,
    ``mysql+pymysql://...``). SQLite files run in WAL mode with a busy timeout; keep them on a
    local disk and use a server database to share records between hosts.

    ``engine`` and ``session`` (a session factory) are created on first use in each process;
    a pickled ``Sql`` carries its settings only and connects again where it is unpickled, and a
    forked child drops the connections it inherited. Two ``Sql`` with the same settings are
    equal.

    Metadata sections must be dicts of JSON values (dict with str keys, list, str, int, finite
    float, bool, None) without NUL characters, so that a loaded record equals the saved one.

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

    url: str | None = None
    echo: bool = False
    engine: Any = field(default=None, init=False, compare=False, repr=False)
    session: Any = field(default=None, init=False, compare=False, repr=False)
    _local: threading.local | None = field(default=None, init=False, compare=False, repr=False)
    _binds: dict[Intent, Any] | None = field(default=None, init=False, compare=False, repr=False)
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

    def _connect(self) -> dict[Intent, Any]:
        """The binds for reads and writes of this process; creates the engine on first use."""
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
                binds = {
                    Intent.READ: engine,
                    Intent.WRITE: engine.execution_options(fleche_immediate=True),
                }
            else:
                binds = {
                    Intent.READ: engine.execution_options(isolation_level="REPEATABLE READ"),
                    Intent.WRITE: engine,  # READ COMMITTED, see _sql_engine.create_engine
                }
            object.__setattr__(self, "engine", engine)
            object.__setattr__(self, "session", sessionmaker(expire_on_commit=False))
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
    def _session_scope(self, intent: Intent) -> Iterator[Session]:
        """The session of the operation running in this thread, or a new one in a transaction.

        Nested operations (``load`` calling ``expand``) share the outermost session, so one
        operation is one transaction.
        """
        binds = self._connect()
        local = self._local
        current = getattr(local, "session", None)
        if current is not None:
            yield current
            return
        session = self.session(bind=binds[intent])
        local.session = session
        try:
            with session.begin():
                yield session
        finally:
            local.session = None
            session.close()

    @contextlib.contextmanager
    def _operation_context(
        self, key: Digest | str, *, intent: Intent = Intent.WRITE
    ) -> Iterator[None]:
        # The per-key lock first, so threads waiting for it hold no connection.
        with super()._operation_context(key, intent=intent):
            with self._session_scope(intent):
                yield

    def _in_operation(self) -> bool:
        return self._local is not None and getattr(self._local, "session", None) is not None

    @property
    def _dialect(self) -> str:
        return self._connect()[Intent.READ].dialect.name

    # -- primitives -------------------------------------------------------------------------

    def _persist_call(self, call: DigestedCall, key: Digest) -> Digest:
        """Write ``call`` under ``key`` in the current transaction, replacing an earlier record."""
        row = {
            "key": str(key),
            "name": call.name,
            "module": call.module,
            "version": call.version,
            "code_digest": call.code_digest,
            "result": None if call.result is None else str(call.result),
            "has_metadata": call.metadata is not None,
        }
        argument_rows = [
            {"call_key": str(key), "position": i, "name": name, "value": str(value)}
            for i, (name, value) in enumerate(call.arguments.items())
        ]
        metadata_rows = [
            {"call_key": str(key), "position": i, "section": section, "data": _dump(entries)}
            for i, (section, entries) in enumerate((call.metadata or {}).items())
        ]
        with self._session_scope(Intent.WRITE) as s:
            # The upsert locks the calls row first, so concurrent saves of one key queue up here
            # and each replaces the rows below as a whole.
            s.execute(self._upsert(row))
            s.execute(sa.delete(arguments).where(arguments.c.call_key == key))
            s.execute(sa.delete(metadata_sections).where(metadata_sections.c.call_key == key))
            if argument_rows:
                s.execute(sa.insert(arguments), argument_rows)
            if metadata_rows:
                s.execute(sa.insert(metadata_sections), metadata_rows)
        return key

    def _upsert(self, row: dict[str, Any]) -> Any:
        values = {k: v for k, v in row.items() if k != "key"}
        name = self._dialect
        if name == "sqlite":
            stmt = sqlite.insert(calls).values(**row)
            return stmt.on_conflict_do_update(index_elements=[calls.c.key], set_=values)
        if name == "postgresql":
            stmt = postgresql.insert(calls).values(**row)
            return stmt.on_conflict_do_update(index_elements=[calls.c.key], set_=values)
        if name in ("mysql", "mariadb"):
            return mysql.insert(calls).values(**row).on_duplicate_key_update(**values)
        raise DatabaseError(_safe_url(self.url), f"the {name} dialect is not supported")

    def _fetch_call(self, key: Digest) -> DigestedCall:
        """The record stored under the full key ``key``; ``KeyError`` if there is none."""
        with self._session_scope(Intent.READ) as s:
            found = self._fetch_many(s, [key])
        if not found:
            raise KeyError(f"nothing stored under {key}")
        return found[0]

    def _fetch_many(self, s: Session, keys: list[str]) -> list[DigestedCall]:
        """The records stored under ``keys`` (missing ones left out), read in one transaction."""
        rows = s.execute(sa.select(calls).where(calls.c.key.in_(keys))).all()
        if not rows:
            return []
        args: dict[str, dict[str, Digest]] = {}
        for call_key, name, value in s.execute(
            sa.select(arguments.c.call_key, arguments.c.name, arguments.c.value)
            .where(arguments.c.call_key.in_(keys))
            .order_by(arguments.c.call_key, arguments.c.position)
        ):
            args.setdefault(call_key, {})[name] = _mk(value)
        meta: dict[str, dict[str, Any]] = {}
        for call_key, section, data in s.execute(
            sa.select(metadata_sections.c.call_key, metadata_sections.c.section, metadata_sections.c.data)
            .where(metadata_sections.c.call_key.in_(keys))
            .order_by(metadata_sections.c.call_key, metadata_sections.c.position)
        ):
            try:
                meta.setdefault(call_key, {})[section] = json.loads(data)
            except ValueError as e:
                raise CorruptEntryError(
                    call_key, f"{_safe_url(self.url)} table fleche_metadata", f"bad JSON: {e}"
                ) from None
        records = []
        for row in rows:
            r = row._mapping
            records.append(
                DigestedCall(
                    name=r["name"],
                    arguments=args.get(r["key"], {}),
                    metadata=meta.get(r["key"], {}) if r["has_metadata"] else None,
                    module=r["module"],
                    version=r["version"],
                    code_digest=r["code_digest"],
                    result=None if r["result"] is None else _mk(r["result"]),
                )
            )
        return records

    def _contains(self, key: Digest) -> bool:
        with self._session_scope(Intent.READ) as s:
            return s.execute(sa.select(calls.c.key).where(calls.c.key == key)).first() is not None

    def _evict(self, key: Digest) -> None:
        with self._session_scope(Intent.WRITE) as s:
            # Arguments and metadata go with it (ON DELETE CASCADE).
            deleted = s.execute(sa.delete(calls).where(calls.c.key == key)).rowcount
        if not deleted:
            raise KeyError(f"nothing stored under {key}")

    # -- public operations ------------------------------------------------------------------

    def list(self) -> Iterable[Digest]:
        """Every stored key, sorted: a snapshot of one moment, which other processes may change
        at once."""
        with self._session_scope(Intent.READ) as s:
            return [_mk(k) for k in s.execute(sa.select(calls.c.key).order_by(calls.c.key)).scalars()]

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
            with self._session_scope(Intent.READ) as s:
                matches = s.execute(
                    sa.select(calls.c.key).where(
                        calls.c.key >= text,
                        calls.c.key < text + "g",  # lets the primary key index serve the scan
                        calls.c.key.like(text + "%"),
                    )
                ).scalars().all()
        return _unique_match(text, matches)

    def save(self, call: DigestedCall | Call) -> Digest:
        """Store the record under its lookup key, replacing an earlier one, and return the key.

        One transaction: a reader in any thread or process sees the old record or the new one,
        never neither and never a mix. Concurrent saves of the same key from many processes
        succeed (the last one wins); deadlocks and serialization failures are retried. Raises
        :class:`SaveError`, with nothing written, for a record the database cannot hold exactly.
        """
        if not isinstance(call, Call):
            raise TypeError(f"a call storage saves Call records, got {type(call).__name__}")
        record = call.digest()
        _check_record(record)
        key = record.to_lookup_key()
        self._retrying(key, lambda: self._persist_call(record, key))
        return key

    def evict(self, key: Digest | str) -> None:
        """Remove the record under ``key``; ``KeyError`` if there is none.

        One transaction; arguments and metadata go with the record. Retried on deadlocks like
        :meth:`save`.
        """
        key = self._normalize_key(key)
        self._retrying(key, lambda: self._evict(key))

    def load(self, key: Digest | str) -> DigestedCall:
        """Return the record stored under ``key`` (full or short); ``KeyError`` if absent.

        Reads in one snapshot, so a concurrent save in any process is seen whole or not at all.
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
        with self._session_scope(Intent.READ) as s:
            keys = s.execute(sa.select(calls.c.key).where(*conditions)).scalars().all()
        for start in range(0, len(keys), _CHUNK):
            with self._session_scope(Intent.READ) as s:
                batch = self._fetch_many(s, keys[start : start + _CHUNK])
            for call in batch:
                if template.matches(call):
                    yield call

