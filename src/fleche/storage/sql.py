"""A call storage in an SQL database (SQLite, PostgreSQL, MariaDB/MySQL) via SQLAlchemy 2.

Every host that can reach the database shares the records, so this is the call storage for a
cluster. Calls, their arguments and their metadata sections live in three tables; queries run in
the database. Needs the ``sql`` extra (``pip install "fleche[sql]"``).

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
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from ..call import Call, DigestedCall, QueryCall
from ..digest import DIGEST_LENGTH, MIN_PREFIX_LENGTH, Digest, _mk, digest
from ..errors import (
    CorruptEntryError,
    DatabaseError,
    NetworkFilesystemWarning,
    SaveError,
    SchemaVersionError,
)
from .base import CallStorage, Intent, _check_key_text, _unique_match
from .thread_safe import PerKeyLockMixin

__all__ = ["SCHEMA_VERSION", "Sql"]

SCHEMA_VERSION = 1
"""Version of the table layout below; a database of another version is refused."""

_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite connection waits for another process's write lock before failing."""

_CHUNK = 500
"""Keys per ``IN (...)`` when loading many calls at once."""

# -- schema ---------------------------------------------------------------------------------------

_LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
# MySQL/MariaDB compare text case-insensitively by default; a binary collation keeps equality
# exact (query results are still re-checked in Python, so this is about index selectivity).
_TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}

schema = sa.MetaData()
"""The fleche tables (all named ``fleche_*``)."""

versions = sa.Table(
    "fleche_schema",
    schema,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
    **_TABLE_ARGS,
)

calls = sa.Table(
    "fleche_calls",
    schema,
    sa.Column("key", sa.String(DIGEST_LENGTH), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("module", sa.Text),
    sa.Column("version", sa.Text),
    sa.Column("code_digest", sa.Text),
    sa.Column("result", sa.String(DIGEST_LENGTH)),
    sa.Column("has_metadata", sa.Boolean, nullable=False),
    sa.Index("ix_fleche_calls_name", "name", mysql_length=255),
    sa.Index("ix_fleche_calls_result", "result"),
    **_TABLE_ARGS,
)

arguments = sa.Table(
    "fleche_arguments",
    schema,
    sa.Column(
        "call_key",
        sa.String(DIGEST_LENGTH),
        sa.ForeignKey("fleche_calls.key", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("value", sa.String(DIGEST_LENGTH), nullable=False),
    sa.Index("ix_fleche_arguments_value", "value", "name", mysql_length={"name": 255}),
    **_TABLE_ARGS,
)

metadata_sections = sa.Table(
    "fleche_metadata",
    schema,
    sa.Column(
        "call_key",
        sa.String(DIGEST_LENGTH),
        sa.ForeignKey("fleche_calls.key", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("section", sa.Text, nullable=False),
    sa.Column("data", _LONG_TEXT, nullable=False),
    sa.Index("ix_fleche_metadata_section", "section", mysql_length=255),
    **_TABLE_ARGS,
)

# -- processes ------------------------------------------------------------------------------------

# Guards the lazy creation of engines. Replaced in a forked child, where it may have been copied
# while another thread of the parent held it.
_setup_lock = threading.Lock()


def _fresh_setup_lock() -> None:
    global _setup_lock
    _setup_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_setup_lock)


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
        with _setup_lock:
            if self._binds is not None and self._pid == pid:
                return self._binds
            if self.engine is not None:
                # Inherited through fork: leave the parent's connections alone, open our own.
                self.engine.dispose(close=False)
            url = self._sqlalchemy_url()
            engine = _create_engine(url, self.echo)
            try:
                _ensure_schema(engine, url)
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
                    Intent.WRITE: engine,  # READ COMMITTED, see _create_engine
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


# -- helpers --------------------------------------------------------------------------------------

_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_.\-]+")

_NETWORK_FILESYSTEMS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs", "fuse.gcsfuse",
    "fuse.rclone", "davfs", "fuse.davfs2", "orangefs", "pvfs2",
}


def _dump(entries: Mapping[str, Any]) -> str:
    return json.dumps(dict(entries), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _storable(text: str) -> bool:
    """Whether every database can hold ``text`` exactly (PostgreSQL refuses NUL; UTF-8 lone
    surrogates)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(value: Any, what: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) is not str:
        raise SaveError(f"{what} must be a str, got {type(value).__name__}: {value!r}")
    if not _storable(value):
        raise SaveError(f"{what} {value!r} holds a NUL character or a lone surrogate")


def _check_digest(value: Any, what: str) -> None:
    if not isinstance(value, str) or len(value) != DIGEST_LENGTH:
        raise SaveError(f"{what} must be a full Digest, got {value!r}")
    try:
        Digest(str(value))
    except ValueError:
        raise SaveError(f"{what} must be a full Digest, got {value!r}") from None


def _check_json(value: Any, where: str) -> None:
    """Refuse what JSON would not give back as it is (tuples, int keys, NaN, ...)."""
    t = type(value)
    if t is str:
        _check_text(value, where)
    elif t is float:
        if not math.isfinite(value):
            raise SaveError(f"{where} is {value!r}; JSON has no NaN or infinity")
    elif t in (int, bool, type(None)):
        pass
    elif t is list:
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif t is dict:
        for k, item in value.items():
            _check_text(k, f"key {k!r} in {where}")
            _check_json(item, f"{where}[{k!r}]")
    else:
        raise SaveError(
            f"{where} is a {t.__name__}; metadata entries must be JSON values (dict with str "
            "keys, list, str, int, float, bool, None) so that they load back unchanged"
        )


def _check_record(call: DigestedCall) -> None:
    """Raise :class:`SaveError` unless the database can hold ``call`` so it loads back equal."""
    try:
        _check_text(call.name, "the call's name")
        for attr in ("module", "version", "code_digest"):
            _check_text(getattr(call, attr), f"the call's {attr}", optional=True)
        if not isinstance(call.arguments, Mapping):
            raise SaveError(f"arguments must be a mapping, got {type(call.arguments).__name__}")
        for name, value in call.arguments.items():
            _check_text(name, "an argument name")
            _check_digest(value, f"argument {name!r}")
        if call.result is not None:
            _check_digest(call.result, "the result")
        if call.metadata is not None:
            if not isinstance(call.metadata, Mapping):
                raise SaveError(f"metadata must be a mapping, got {type(call.metadata).__name__}")
            for section, entries in call.metadata.items():
                _check_text(section, "a metadata section name")
                if not isinstance(entries, Mapping):
                    raise SaveError(
                        f"metadata section {section!r} must be a mapping, got {entries!r}"
                    )
                _check_json(dict(entries), f"metadata[{section!r}]")
    except SaveError as e:
        raise SaveError(f"cannot save a call of {call.name!r}: {e}") from None


def _safe_url(url: str | None) -> str:
    """``url`` with its password replaced by ``***``."""
    if url is None:
        return str(Path(platformdirs.user_cache_dir("fleche")) / "calls.sqlite")
    if "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: mask anything between "user:" and "@"
        return re.sub(r"(://[^/@:]*:)[^@]*@", r"\1***@", url)


def _reason(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def _is_transient(e: exc.DBAPIError) -> bool:
    """Whether retrying the transaction may succeed: deadlock, serialization failure, lock
    timeout, a busy SQLite file, a lost connection or a racing insert."""
    if e.connection_invalidated or isinstance(e, exc.IntegrityError):
        return True
    orig = e.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in ("40001", "40P01", "55P03"):
        return True
    code = orig.args[0] if getattr(orig, "args", None) else None
    if isinstance(orig, sqlite3.Error):
        return (getattr(orig, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return code in (1205, 1213)  # MySQL lock wait timeout, deadlock


def _filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem holding ``path``, from ``/proc/self/mounts`` (Linux only)."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, parts[2]
    return best_type


def _is_network_filesystem(fstype: str | None) -> bool:
    return fstype is not None and (fstype in _NETWORK_FILESYSTEMS or fstype.startswith("nfs"))


def _create_engine(url: URL, echo: bool) -> sa.Engine:
    safe = url.render_as_string(hide_password=True)
    try:
        if url.get_backend_name() == "sqlite":
            return _create_sqlite_engine(url, echo)
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
        # Writes run in READ COMMITTED: each statement of a replacing save sees the rows the
        # previous writer committed. Reads switch to REPEATABLE READ for one snapshot.
        kwargs["isolation_level"] = "READ COMMITTED"
        if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
            kwargs["connect_args"] = {"connect_timeout": 15}
        return sa.create_engine(url, **kwargs)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as e:
        raise DatabaseError(safe, f"not a usable database URL ({e})") from None


def _create_sqlite_engine(url: URL, echo: bool) -> sa.Engine:
    database = url.database
    on_disk = bool(database) and database != ":memory:" and not database.startswith("file:")
    journal = "WAL"
    if on_disk:
        fstype = _filesystem_type(Path(database).parent)
        if _is_network_filesystem(fstype):
            journal = "DELETE"
            warnings.warn(
                f"the SQLite database {database} is on a network filesystem ({fstype}): WAL mode "
                "does not work there, so fleche uses a rollback journal, and whether several "
                "hosts can share the file safely depends on that filesystem's locking. To share "
                "calls across hosts, use a PostgreSQL or MariaDB URL instead.",
                NetworkFilesystemWarning,
                stacklevel=4,
            )
    engine = sa.create_engine(url, echo=echo, connect_args={"timeout": _BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let us issue BEGIN ourselves (below) instead of the driver's implicit one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if on_disk:
            cursor.execute(f"PRAGMA journal_mode={journal}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # A write takes the write lock at BEGIN, waiting up to the busy timeout; a deferred
        # BEGIN that upgrades later could fail at once with SQLITE_BUSY instead.
        immediate = conn.get_execution_options().get("fleche_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _ensure_schema(engine: sa.Engine, url: URL) -> None:
    """Create the tables if missing and check the schema version; safe against racing
    processes (the loser of a creation race retries and finds the tables)."""
    safe = url.render_as_string(hide_password=True)
    bind = engine.execution_options(fleche_immediate=True)
    for attempt in range(20):
        try:
            with bind.begin() as conn, _schema_lock(conn):
                found = None
                if sa.inspect(conn).has_table(versions.name):
                    found = conn.execute(
                        sa.select(versions.c.value).where(versions.c.name == "version")
                    ).scalar()
                if found is None:
                    schema.create_all(conn)
                    conn.execute(sa.insert(versions).values(name="version", value=SCHEMA_VERSION))
                elif found != SCHEMA_VERSION:
                    raise SchemaVersionError(safe, found, SCHEMA_VERSION)
            return
        except (exc.OperationalError, exc.ProgrammingError, exc.IntegrityError) as e:
            if not _is_schema_race(e) or attempt == 19:
                raise DatabaseError(safe, _reason(e)) from None
            time.sleep(random.uniform(0, 0.05 * (attempt + 1)))
        except exc.DBAPIError as e:
            raise DatabaseError(safe, _reason(e)) from None


_SCHEMA_LOCK_ID = 0x666C6563  # "flec": the PostgreSQL advisory lock guarding table creation


@contextlib.contextmanager
def _schema_lock(conn: sa.Connection) -> Iterator[None]:
    """Serialize table creation between processes (SQLite's BEGIN IMMEDIATE already does)."""
    name = conn.dialect.name
    if name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_ID)))
        yield
    elif name in ("mysql", "mariadb"):
        # DDL commits implicitly in MySQL, so this lock lives on the session, not a transaction.
        if conn.execute(sa.select(sa.func.get_lock("fleche_schema", 60))).scalar() != 1:
            raise exc.OperationalError("GET_LOCK('fleche_schema')", {}, Exception("timed out"))
        try:
            yield
        finally:
            conn.execute(sa.select(sa.func.release_lock("fleche_schema")))
    else:
        yield


def _is_schema_race(e: exc.DBAPIError) -> bool:
    """Whether ``e`` comes from another process creating the same tables at the same time."""
    if isinstance(e, exc.IntegrityError) or _is_transient(e):
        return True
    text = str(e.orig).lower()
    return any(word in text for word in ("already exists", "duplicate", "concurrent ddl", "timed out"))
