"""The Sql call storage on SQLite (always), PostgreSQL and MariaDB (when their URLs are set).

Set ``FLECHE_TEST_POSTGRES_URL`` / ``FLECHE_TEST_MARIADB_URL`` to an empty database each
(``.ci/run`` does); every test drops the fleche tables before and after itself.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

sa = pytest.importorskip("sqlalchemy")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fleche.call import Call, DigestedCall, QueryCall  # noqa: E402
from fleche.digest import Digest, digest  # noqa: E402
from fleche.errors import (  # noqa: E402
    CorruptEntryError,
    DatabaseError,
    LockTimeout,
    SaveError,
    SchemaVersionError,
    SignatureError,
)
from fleche.storage import CallMemory, Intent  # noqa: E402
from fleche.storage.sql.dialects.sqlite import (  # noqa: E402
    filesystem_type as _filesystem_type,
    is_network_filesystem as _is_network_filesystem,
)
from fleche.storage.sql.schema import (  # noqa: E402
    SCHEMA_VERSION,
    arguments,
    calls,
    metadata_sections,
    schema,
    versions,
)
from fleche.storage.sql import Sql  # noqa: E402
from fleche.testing import FULL_SIZE as FULL  # noqa: E402  (FLECHE_STRESS=full)
from fleche.testing import CallStorageTests  # noqa: E402

SERVERS = {
    "postgresql": "FLECHE_TEST_POSTGRES_URL",
    "mariadb": "FLECHE_TEST_MARIADB_URL",
}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _server_url(kind: str) -> str:
    url = os.environ.get(SERVERS[kind])
    if not url:
        pytest.skip(f"{SERVERS[kind]} is not set: {kind} tests need an empty database URL there")
    return url


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(Sql(url)._sqlalchemy_url())


def _drop_tables(url: str) -> None:
    engine = _engine(url)
    try:
        schema.drop_all(engine)
    finally:
        engine.dispose()


def _close(storage: Sql) -> None:
    if storage.engine is not None:
        storage.engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db_url(request: Any, tmp_path: Path) -> Any:
    """An empty database of each kind: a SQLite file, or a server database with no fleche tables."""
    url = str(tmp_path / "calls.sqlite") if request.param == "sqlite" else _server_url(request.param)
    _drop_tables(url)
    yield url
    _drop_tables(url)


@pytest.fixture
def sql(db_url: str) -> Any:
    storage = Sql(db_url)
    yield storage
    _close(storage)


# -- the storage contract ---------------------------------------------------------------------


class _SqlContract(CallStorageTests):
    shared_between_processes = True

    def url_for(self, tmp_path: Path) -> str:
        raise NotImplementedError

    def make_storage(self, tmp_path: Path) -> Sql:
        return Sql(self.url_for(tmp_path))

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Any:
        url = self.url_for(tmp_path)
        _drop_tables(url)
        storage = Sql(url)
        yield storage
        _close(storage)
        _drop_tables(url)


class TestSqlSqlite(_SqlContract):
    def url_for(self, tmp_path: Path) -> str:
        return str(tmp_path / "calls.sqlite")


class TestSqlPostgres(_SqlContract):
    def url_for(self, tmp_path: Path) -> str:
        return _server_url("postgresql")


class TestSqlMariaDB(_SqlContract):
    def url_for(self, tmp_path: Path) -> str:
        return _server_url("mariadb")


# -- settings, URLs and errors ----------------------------------------------------------------


def _f(x: Any, y: Any = 0) -> Any:
    return x


def _call(i: int, **changes: Any) -> DigestedCall:
    call = Call.from_call(_f, i, y=i % 3).replace(result=i, metadata={"run": {"i": i}})
    return call.replace(**changes).digest()


def test_plain_paths_mean_sqlite_files(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Sql("~/db/calls.sqlite").url == str(tmp_path / "db" / "calls.sqlite")
    assert Sql(tmp_path / "a.sqlite").url == str(tmp_path / "a.sqlite")
    storage = Sql(tmp_path / "sub" / "dir" / "a.sqlite")
    key = storage.save(_call(1))
    assert (tmp_path / "sub" / "dir" / "a.sqlite").exists()
    assert storage.load(key) == _call(1)
    _close(storage)
    monkeypatch.chdir(tmp_path)
    assert Sql("rel.sqlite").url == str(tmp_path / "rel.sqlite")


def test_default_location_is_the_user_cache(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    storage = Sql()
    key = storage.save(_call(2))
    assert (tmp_path / "cache" / "fleche" / "calls.sqlite").exists()
    assert Sql().load(key) == _call(2)
    _close(storage)


def test_fields_are_lazy_and_equality_is_by_settings(tmp_path: Path) -> None:
    a, b = Sql(tmp_path / "x.sqlite"), Sql(tmp_path / "x.sqlite")
    assert a.engine is None and a.session is None
    assert a == b and hash(a) == hash(b)
    assert a != Sql(tmp_path / "x.sqlite", echo=True) and a != Sql(tmp_path / "y.sqlite")
    a.save(_call(1))
    assert a.engine is not None and a == b
    _close(a)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://fleche:s3cret-pw@127.0.0.1:1/nowhere",
        "mysql+pymysql://fleche:s3cret-pw@127.0.0.1:1/nowhere",
    ],
)
def test_unreachable_server_names_url_without_password(url: str) -> None:
    storage = Sql(url)
    assert "s3cret-pw" not in repr(storage)
    with pytest.raises(DatabaseError) as info:
        storage.load(digest("anything"))
    text = "".join(traceback.format_exception(info.value))
    assert "127.0.0.1:1/nowhere" in str(info.value) and "***" in str(info.value)
    assert "s3cret-pw" not in text
    assert isinstance(info.value, ConnectionError)


@pytest.mark.parametrize(
    "url",
    ["nosuchdb+driver://fleche:s3cret-pw@host/db", "postgresql+nodriver://fleche:s3cret-pw@host/db"],
)
def test_wrong_url_is_refused_clearly(url: str) -> None:
    with pytest.raises(DatabaseError, match="not a usable database URL") as info:
        Sql(url).save(_call(1))
    assert "s3cret-pw" not in "".join(traceback.format_exception(info.value))


def test_missing_database_on_server_is_named() -> None:
    base = sa.engine.make_url(_server_url("postgresql"))
    url = base.set(database="fleche_no_such_database", password="s3cret-pw")
    with pytest.raises(DatabaseError, match="fleche_no_such_database") as info:
        Sql(url.render_as_string(hide_password=False)).list()
    assert "s3cret-pw" not in str(info.value)


def test_other_schema_version_is_refused(db_url: str) -> None:
    storage = Sql(db_url)
    key = storage.save(_call(3))
    _close(storage)
    engine = _engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.update(versions).values(value=SCHEMA_VERSION + 1))
    try:
        with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}"):
            Sql(db_url).load(key)
        with engine.begin() as conn:
            assert conn.execute(sa.select(versions.c.value)).scalar() == SCHEMA_VERSION + 1
            conn.execute(sa.update(versions).values(value=SCHEMA_VERSION))
        again = Sql(db_url)
        assert again.load(key) == _call(3)  # nothing was lost
        _close(again)
    finally:
        engine.dispose()


# -- records ------------------------------------------------------------------------------------


def test_versions_keep_their_type(sql: Sql) -> None:
    """A call's version may be an int as well as a str; each loads with its type and the two
    never meet: ``1`` and ``"1"`` are different keys, found by different queries."""
    records = {v: _call(1, version=v) for v in (1, "1", None, 0, 2**80, -3)}
    keys = {v: sql.save(r) for v, r in records.items()}
    assert len(set(keys.values())) == len(records)
    for v, key in keys.items():
        loaded = sql.load(key)
        assert loaded == records[v] and type(loaded.version) is type(v) and loaded.version == v
        assert loaded.to_lookup_key() == key
    assert [c.version for c in sql.query(QueryCall(version=1))] == [1]
    assert [c.version for c in sql.query(QueryCall(version="1"))] == ["1"]
    assert [c.version for c in sql.query(QueryCall(version=2**80))] == [2**80]
    assert {type(c.version) for c in sql.query(QueryCall(name="_f"))} == {int, str, type(None)}
    for bad in (True, 1.0, b"1"):
        with pytest.raises(SaveError, match="version"):
            sql.save(_call(2, version=bad))
    assert set(sql.list()) == set(keys.values())


_SCHEMA_2 = Path(__file__).parent / "data" / "sql_schema2.sqlite"
"""A SQLite database of schema version 2, written by fleche before integer versions: three calls
of ``area`` (versions None, "1", "2.0") with metadata and inline values of the old format."""


def _schema_2_rows() -> dict[str, list[dict[str, Any]]]:
    with sqlite3.connect(_SCHEMA_2) as conn:
        conn.row_factory = sqlite3.Row
        return {
            table: [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]
            for table in ("fleche_schema", "fleche_calls", "fleche_arguments", "fleche_metadata")
        }


def _make_schema_2(db_url: str, tmp_path: Path) -> str:
    """A database of schema version 2 holding the calls of ``_SCHEMA_2``: the file itself for
    SQLite; for a server, the version 2 tables (today's without ``version_type``) with its rows."""
    import shutil

    if "://" not in db_url:
        target = tmp_path / "schema2.sqlite"
        shutil.copy(_SCHEMA_2, target)
        return str(target)
    engine = _engine(db_url)
    try:
        schema.create_all(engine)
        with engine.begin() as conn:
            _drop_started(conn)
            conn.execute(sa.text("ALTER TABLE fleche_calls DROP COLUMN version_type"))
        old = sa.MetaData()
        tables = {name: sa.Table(name, old, autoload_with=engine) for name in _schema_2_rows()}
        with engine.begin() as conn:
            for name, rows in _schema_2_rows().items():
                if rows:
                    conn.execute(sa.insert(tables[name]), rows)
    finally:
        engine.dispose()
    return db_url


def test_a_schema_2_database_is_migrated_in_place(db_url: str, tmp_path: Path) -> None:
    """Opening a database written by an older fleche (schema 2) migrates it to schema 4:
    every call loads as it was, old inline values included, and integer versions can be saved."""
    url = _make_schema_2(db_url, tmp_path)
    expected = _schema_2_rows()["fleche_calls"]
    storage = Sql(url)
    assert sorted(storage.list()) == sorted(r["key"] for r in expected)
    for row in expected:
        call = storage.load(row["key"])
        assert call.to_lookup_key() == row["key"] and call.version == row["version"]
        assert call.metadata["function"]["version"] == row["version"]
        (value,) = call.inline.values()
        assert call.result == digest(value)
    assert [c.version for c in storage.query(QueryCall(version="1"))] == ["1"]
    key = storage.save(_call(5, version=5))
    assert storage.load(key).version == 5
    _close(storage)
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.select(versions.c.value)).scalar() == SCHEMA_VERSION == 4
    finally:
        engine.dispose()
    again = Sql(url)  # a second opening finds schema 4 and changes nothing
    assert again.load(key).version == 5 and len(again.list()) == len(expected) + 1
    _close(again)


def _drop_started(conn: sa.Connection) -> None:
    """Take ``fleche_calls.started`` and its index away (what schema 3 lacks of schema 4's)."""
    (index,) = [i for i in calls.indexes if i.name == "ix_fleche_calls_started"]
    index.drop(conn)
    conn.execute(sa.text("ALTER TABLE fleche_calls DROP COLUMN started"))


def test_a_schema_3_database_gets_the_started_column_filled(
    db_url: str, monkeypatch: Any
) -> None:
    """Migrating schema 3 to 4 adds ``fleche_calls.started`` and fills it from every stored
    record, batch after batch, so ``newest`` orders the old calls like new ones."""
    from fleche.storage.sql import schema as schema_module

    monkeypatch.setattr(schema_module, "_FILL_BATCH", 2)  # several batches of five calls
    starts = ["2026-01-02T00:00:00+00:00", None, "2026-01-04T00:00:00+00:00",
              "2026-01-01T00:00:00+00:00", "2026-01-03T00:00:00+00:00"]
    old = Sql(db_url)
    keys = [
        old.save(_call(i, metadata=None if s is None else {"runtime": {"start": s}}))
        for i, s in enumerate(starts)
    ]
    _close(old)
    engine = _engine(db_url)
    try:
        with engine.begin() as conn:
            _drop_started(conn)
            conn.execute(sa.update(versions).values(value=3))
    finally:
        engine.dispose()
    storage = Sql(db_url)
    assert storage.newest(10) == [keys[2], keys[4], keys[0], keys[3], keys[1]]
    assert storage.newest(2) == [keys[2], keys[4]]
    with storage.engine.connect() as conn:
        assert conn.execute(sa.select(versions.c.value)).scalar() == SCHEMA_VERSION == 4
        stored = dict(conn.execute(sa.select(calls.c.key, calls.c.started)).all())
    assert stored == dict(zip(keys, starts))
    _close(storage)


def test_newest_reads_the_started_column(sql: Sql) -> None:
    """``newest`` orders by the indexed column, not by decoding records: a call whose record is
    damaged still counts, and a start longer than the column keeps its first characters."""
    dated = [sql.save(_call(i, metadata={"runtime": {"start": f"2026-01-0{i}T00:00:00"}}))
             for i in range(1, 4)]
    long = sql.save(_call(7, metadata={"runtime": {"start": "2027" + "x" * 400}}))
    other = sql.save(_call(8, metadata={"runtime": {"start": 5}}))  # not text: no start
    with sql.engine.begin() as conn:
        conn.execute(sa.update(calls).where(calls.c.key == dated[0]).values(record="{oops"))
        assert conn.execute(
            sa.select(calls.c.started).where(calls.c.key == long)
        ).scalar() == ("2027" + "x" * 400)[:255]
    assert sql.newest(10) == [long, *reversed(dated), other]
    with pytest.raises(ValueError, match="limit"):
        sql.newest(-1)


def test_compiled_statements_fail_as_sqlalchemy_would(sql: Sql) -> None:
    """The write path runs statements compiled once on the bare driver; its errors are still
    SQLAlchemy's (so a racing insert is retried like any), and the transaction rolls back."""
    from fleche.storage.sql.statements import INSERT_ARGUMENTS, raw_cursor

    key = sql.save(_call(1))
    state = sql._connect()
    duplicate = {"call_key": key, "position": 0, "name": "x", "value": "0" * 64}
    with pytest.raises(sa.exc.IntegrityError):
        with state.write.connect() as conn, conn.begin(), raw_cursor(conn) as cursor:
            state.compiled(INSERT_ARGUMENTS).executemany(cursor, [duplicate])
    assert sql.load(key) == _call(1)
    assert sql.save(_call(1)) == key  # the pool's connection is fine afterwards


def test_shrink_looks_up_neighbours_only(sql: Sql) -> None:
    """``shrink`` answers what the listing would, from the keys next to each one."""
    from fleche.storage.base import KeyManagement

    keys = [sql.save(_call(i)) for i in range(300)]
    assert sql.shrink(*keys) == KeyManagement.shrink(sql, *keys)
    assert sql.shrink(keys[7]) == KeyManagement.shrink(sql, keys[7])
    assert sql.shrink(sql.shrink(keys[9])) == sql.shrink(keys[9])
    with pytest.raises(KeyError, match="only stored keys"):
        sql.shrink(keys[0], "0" * 64)


def test_migrating_racing_processes(db_url: str, tmp_path: Path) -> None:
    """Four processes open a schema 2 database at once; one migrates, all read it."""
    url = _make_schema_2(db_url, tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        counts = pool.map(_count_calls, [url] * 4)
    assert counts == [len(_schema_2_rows()["fleche_calls"])] * 4


def _count_calls(url: str) -> int:
    storage = Sql(url)
    n = len(storage.list())
    _close(storage)
    return n


def test_records_round_trip_exactly(sql: Sql) -> None:
    records = [
        _call(1, metadata=None),
        _call(2, metadata={}),
        _call(3, metadata={"a": {}, "b": {"x": [1, 2.5, None, {"k": "é😀"}], "y": -0.0}}),
        _call(4, module=None, version="v1", code_digest="abc"),
        DigestedCall(name="no_args", arguments={}, result=None),
        DigestedCall(name="ordered", arguments={"z": digest(1), "a": digest(2), "m": digest(3)}),
    ]
    for record in records:
        key = sql.save(record)
        loaded = sql.load(key)
        assert loaded == record
        assert list(loaded.arguments) == list(record.arguments)
        assert loaded.metadata is None if record.metadata is None else loaded.metadata == record.metadata


@pytest.mark.parametrize(
    "metadata, what",
    [
        ({"run": {"t": (1, 2)}}, "tuple"),
        ({"run": {"x": float("nan")}}, "NaN"),
        ({"run": {1: "a"}}, "must be a str"),
        ({"run": {"x": "a\x00b"}}, "NUL"),
        ({"run": {"x": Digest(digest(1))}}, "Digest"),
        ({"run": "not a mapping"}, "must be a mapping"),
    ],
)
def test_unstorable_records_are_refused_and_lose_nothing(sql: Sql, metadata: Any, what: str) -> None:
    key = sql.save(_call(5))
    with pytest.raises(SaveError, match=what):
        sql.save(_call(5, metadata=metadata))
    assert sql.load(key) == _call(5)
    with pytest.raises(SaveError, match="NUL"):
        sql.save(_call(6).replace(name="bad\x00name"))
    assert set(sql.list()) == {key}


def test_evict_removes_arguments_and_metadata(sql: Sql) -> None:
    key = sql.save(_call(7))
    other = sql.save(_call(8))
    sql.evict(key)
    with sql._session_scope(Intent.READ) as s:
        for table in (arguments, metadata_sections):
            keys = set(s.execute(sa.select(table.c.call_key)).scalars())
            assert keys == {other}


def test_one_operation_reads_one_snapshot(db_url: str) -> None:
    """A save committed in the middle of a read operation is invisible to the rest of it."""
    reader, writer = Sql(db_url), Sql(db_url)
    key = writer.save(_call(1, metadata={"w": {"v": 1}}))
    with reader._session_scope(Intent.READ):
        before = reader.load(key)
        writer.save(_call(1, result=2, metadata={"w": {"v": 2}}))
        assert reader.load(key) == before
        assert reader.list() == [key]
    assert reader.load(key) == _call(1, result=2, metadata={"w": {"v": 2}})
    _close(reader)
    _close(writer)


def test_expand_rejects_wildcards_before_touching_the_database(sql: Sql) -> None:
    sql.save(_call(1))
    for bad in ["%%%%", "____", "ab%d", "AB12", "ab'1"]:
        with pytest.raises(ValueError):
            sql.expand(bad)


# -- whole records in one row, inline values ------------------------------------------------

def _inline_values() -> list[Any]:
    """Small values of every kind a cache keeps inline."""
    return [*_PLAIN_INLINE_VALUES, *_numpy_values()]


def _numpy_values() -> list[Any]:
    numpy = pytest.importorskip("numpy")
    return [
        numpy.arange(6, dtype=numpy.int32).reshape(2, 3), numpy.linspace(0, 1, 5),
        numpy.array([], dtype=numpy.uint8), numpy.float64(2.5), numpy.int16(-3),
        numpy.array(["ab", "c"]),
    ]


_PLAIN_INLINE_VALUES = [
    None, True, False, 0, -7, 2**70, 1.5, -0.0, 1 + 2j, "", "é😀 text", b"", b"\x00\xffbytes",
    (1, "a", None), [1, [2.5, "x"]], {"a": 1, 2: (3,)}, {1, 2}, frozenset({"f"}),
]


def _same(a: Any, b: Any) -> bool:
    if hasattr(a, "shape") or hasattr(b, "shape"):
        np = pytest.importorskip("numpy")
        return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return type(a) is type(b) and (a == b or repr(a) == repr(b))


def test_inline_values_round_trip(sql: Sql) -> None:
    assert sql.keeps_inline_values
    inline = {digest(v): v for v in _inline_values()}
    record = _call(1).replace(inline=inline)
    key = sql.save(record)
    loaded = sql.load(key)
    assert loaded == record
    assert set(loaded.inline) == set(inline) and all(type(k) is Digest for k in loaded.inline)
    for k, v in inline.items():
        assert _same(loaded.inline[k], v), (v, loaded.inline[k])
    assert [c.inline for c in sql.query(QueryCall(name="_f"))][0].keys() == inline.keys()
    sql.save(_call(1))  # a replacement without inline values drops the old ones
    assert sql.load(key).inline is None


def test_cache_hit_reads_small_values_from_the_record(sql: Sql, tmp_path: Path) -> None:
    from fleche.caches import Cache
    from fleche.storage import ValuePickleFile

    np = pytest.importorskip("numpy")
    values = ValuePickleFile(tmp_path / "values")
    cache = Cache(values, sql)
    small, big = (1, "two", np.arange(3)), np.zeros(10_000)
    key_small = cache.save(Call.from_call(_f, 1).replace(result=small))
    key_big = cache.save(Call.from_call(_f, 2).replace(result=big))
    assert list(values.list()) == [digest(big)]  # only the big value went to the value storage
    assert _same(cache.load_result(key_small)[2], small[2])
    assert cache.load(key_small).arguments["x"] == 1
    assert _same(cache.load_result(key_big), big)


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("no pickling here")


def test_unpicklable_inline_value_is_refused_and_loses_nothing(sql: Sql) -> None:
    key = sql.save(_call(1).replace(inline={digest(1): 1}))
    with pytest.raises(SaveError, match="does not pickle.*no pickling here"):
        sql.save(_call(1, result=5).replace(inline={digest(5): _Unpicklable()}))
    with pytest.raises(SaveError, match="full Digest"):
        sql.save(_call(1).replace(inline={"abc": 1}))
    loaded = sql.load(key)
    assert loaded == _call(1) and loaded.inline == {digest(1): 1}


UNPICKLED: list[str] = []


def _mark_unpickled() -> str:
    UNPICKLED.append("ran")
    return "ran"


class _Trap:
    def __reduce__(self) -> Any:
        return (_mark_unpickled, ())


def test_only_inline_blobs_this_storage_wrote_are_unpickled(sql: Sql, db_url: str) -> None:
    key = sql.save(_call(1).replace(inline={digest(1): 1}))
    other = sql.save(_call(2))
    engine = _engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.update(calls).where(calls.c.key == key).values(inline=pickle.dumps(_Trap())))
            conn.execute(sa.update(calls).where(calls.c.key == other).values(record="{not json"))
        with pytest.raises(CorruptEntryError, match="bad magic") as info:
            sql.load(key)
        assert info.value.key == key and "fleche_calls" in info.value.location
        assert UNPICKLED == []
        with pytest.raises(CorruptEntryError, match="bad record JSON"):
            sql.load(other)
        with engine.begin() as conn:
            conn.execute(sa.update(calls).where(calls.c.key == key).values(inline=b"FLCI\x01garbage"))
        with pytest.raises(CorruptEntryError, match="do not unpickle"):
            sql.load(key)
        sql.save(_call(1))  # a corrupt entry is overwritten by the next save
        assert sql.load(key) == _call(1)
    finally:
        engine.dispose()


def _inline_blob(db_url: str, key: str) -> bytes:
    engine = _engine(db_url)
    try:
        with engine.begin() as conn:
            return bytes(conn.execute(sa.select(calls.c.inline).where(calls.c.key == key)).scalar())
    finally:
        engine.dispose()


def _set_inline_blob(db_url: str, key: str, blob: bytes) -> None:
    engine = _engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.update(calls).where(calls.c.key == key).values(inline=blob))
    finally:
        engine.dispose()


def test_inline_values_are_checksummed(sql: Sql, db_url: str) -> None:
    """Inline values travel in the checked envelope: a flipped or cut byte is refused unread."""
    key = sql.save(_call(1).replace(inline={digest(1): "one"}))
    blob = _inline_blob(db_url, key)
    assert blob[:5] == b"FLCI\x02"  # the envelope, format version 2
    for broken, reason in [
        (blob[:-1] + bytes([blob[-1] ^ 1]), "checksum mismatch"),
        (blob[:-3], "torn"),
        (blob[:12], "truncated"),
    ]:
        _set_inline_blob(db_url, key, broken)
        with pytest.raises(CorruptEntryError, match=reason) as info:
            sql.load(key)
        assert info.value.key == key and "fleche_calls" in info.value.location
    assert UNPICKLED == []
    sql.save(_call(1).replace(inline={digest(1): "one"}))  # overwritten by the next save
    assert sql.load(key).inline == {digest(1): "one"}


def test_inline_values_are_signed_with_a_secret_key(db_url: str, monkeypatch: Any) -> None:
    """With a key, inline values are signed for their row: unsigned, foreign-key and moved
    values are refused with SignatureError; rows without inline values need no signature."""
    monkeypatch.delenv("FLECHE_SECRET_KEY", raising=False)
    signed, other, unsigned = Sql(db_url, secret_key="k1"), Sql(db_url, secret_key=b"k2"), Sql(db_url)
    assert "k1" not in repr(signed)
    a = signed.save(_call(1).replace(inline={digest(1): "a"}))
    b = signed.save(_call(2).replace(inline={digest(2): "b"}))
    plain = signed.save(_call(3))
    assert signed.load(a).inline == {digest(1): "a"} and signed.load(plain) == _call(3)
    assert unsigned.load(a).inline == {digest(1): "a"}  # a checksum needs no key
    with pytest.raises(SignatureError, match="none of"):
        other.load(a)
    assert Sql(db_url, secret_key=["k2", "k1"]).load(a).inline == {digest(1): "a"}  # rotation
    _set_inline_blob(db_url, b, _inline_blob(db_url, a))  # a's values planted in b's row
    with pytest.raises(SignatureError):
        signed.load(b)
    c = unsigned.save(_call(4).replace(inline={digest(4): "c"}))
    with pytest.raises(SignatureError, match="unsigned"):
        signed.load(c)
    monkeypatch.setenv("FLECHE_SECRET_KEY", "k2")
    with pytest.raises(SignatureError, match="unsigned"):
        unsigned.load(c)  # the environment's key applies too
    assert unsigned.load(unsigned.save(_call(4).replace(inline={digest(4): "c"}))).inline == {
        digest(4): "c"
    }
    for storage in (signed, other, unsigned):
        _close(storage)


def test_inline_values_of_the_old_format_still_load(sql: Sql, db_url: str, monkeypatch: Any) -> None:
    """Rows written before the envelope (magic ``FLCI\\x01`` and a bare pickle) load as before
    while no key is set; with a key they are refused as unsigned."""
    monkeypatch.delenv("FLECHE_SECRET_KEY", raising=False)
    key = sql.save(_call(1).replace(inline={digest(1): "old"}))
    _set_inline_blob(db_url, key, b"FLCI\x01" + pickle.dumps({str(digest(1)): "old"}, 5))
    assert sql.load(key).inline == {digest(1): "old"}
    keyed = Sql(db_url, secret_key="k")
    with pytest.raises(SignatureError, match="unsigned"):
        keyed.load(key)
    _close(keyed)


def _version(n: int) -> DigestedCall:
    """Version ``n`` of one record: result, metadata and inline value all say ``n``."""
    value = ("v", n)
    return _call(0, result=value, metadata={"w": {"n": n}}).replace(inline={digest(value): value})


def _whole(record: DigestedCall) -> int:
    """The version ``record`` is, checking that all its parts belong to that one version."""
    n = record.metadata["w"]["n"]
    value = ("v", n)
    assert record.result == digest(value), record
    assert record.inline == {digest(value): value}, record
    return n


def _resave(url: str, started: Any, stop: Any, count: Any) -> None:
    storage = Sql(url)
    n = 1
    while not stop.is_set():
        storage.save(_version(n))
        with count.get_lock():
            count.value = n
        started.set()
        n += 1
    _close(storage)


def test_loads_see_old_or_new_under_concurrent_resaves(sql: Sql, db_url: str) -> None:
    """Another process replaces one record again and again; every load here is one whole
    version, and the versions seen never go back."""
    key = sql.save(_version(0))
    ctx = multiprocessing.get_context("spawn")
    started, stop, count = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    writer = ctx.Process(target=_resave, args=(db_url, started, stop, count))
    writer.start()
    try:
        assert started.wait(timeout=120), "the writer never saved"
        seen: list[int] = []
        while count.value < 100 or len(set(seen)) < 10:
            seen.append(_whole(sql.load(key)))
            assert writer.is_alive() or stop.is_set(), "the writer died"
        assert seen == sorted(seen)  # each load sees a committed version at least as new
    finally:
        stop.set()
        writer.join(timeout=120)
    assert writer.exitcode == 0
    assert _whole(sql.load(key)) >= count.value


# -- query pushdown -----------------------------------------------------------------------------

_VALUES = [0, 1, 1.0, True, False, -0.0, 0.0, "1", "a", "A", "a ", None, (1,), [1], b"1"]
_META_SCALARS = [
    "h1", "H1", "h1 ", "", "é", "\\", '"', "1", 0, 1, -1, 2**70, 0.0, -0.0, 1.0, 0.1, 1e16,
    True, False, None,
]
_META_VALUES = st.one_of(
    st.sampled_from(_META_SCALARS),
    st.sampled_from([[1, 2], [], {"a": 1}, {}, [1.0, "x"]]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=3),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)
_META_KEYS = st.sampled_from(["host", "Host", "n", "a.b", 'we"ird', "é", "", "x y", "b\\c"])
_SECTIONS = st.sampled_from(["runtime", "Runtime", "other"])
_ARG_NAMES = st.sampled_from(["x", "y", "X"])

_calls = st.builds(
    Call,
    name=st.sampled_from(["f", "F", "f ", "g", "é"]),
    arguments=st.dictionaries(_ARG_NAMES, st.sampled_from(_VALUES), max_size=3),
    metadata=st.none()
    | st.dictionaries(_SECTIONS, st.dictionaries(_META_KEYS, _META_VALUES, max_size=3), max_size=2),
    module=st.sampled_from([None, "m", "M"]),
    version=st.sampled_from([None, "1", "1 ", 1, 0, -(2**70)]),
    code_digest=st.sampled_from([None, "abc", "ABC"]),
    result=st.sampled_from(_VALUES),
)

_TEMPLATE_VALUES = st.sampled_from(_VALUES).flatmap(
    lambda v: st.sampled_from([v, digest(v)])
)
_TEMPLATE_META = st.one_of(
    _META_VALUES,
    st.sampled_from([(1, 2), Digest(digest("h1")), float("nan"), float("inf"), "h\x00", 2]),
)
_templates = st.builds(
    QueryCall,
    name=st.none() | st.sampled_from(["f", "F", "g", "h", "f\x00"]),
    arguments=st.none()
    | st.dictionaries(_ARG_NAMES | st.just("nope"), _TEMPLATE_VALUES, max_size=2),
    metadata=st.none()
    | st.dictionaries(
        _SECTIONS,
        st.none() | st.dictionaries(_META_KEYS, _TEMPLATE_META, max_size=2),
        max_size=2,
    ),
    module=st.none() | st.sampled_from(["m", "M", 3]),
    version=st.none() | st.sampled_from(["1", "1 ", 1, 0, True, False, -(2**70)]),
    code_digest=st.none() | st.sampled_from(["abc", "ABC"]),
    result=st.none() | _TEMPLATE_VALUES,
)


def _template_from(call: Call, data: Any) -> QueryCall:
    """A template built from parts of a stored call, so that it matches something."""
    record = call.digest()
    pick = data.draw(st.fixed_dictionaries({f: st.booleans() for f in ["n", "a", "m", "r", "md"]}))
    md = None
    if pick["md"] and call.metadata:
        section = data.draw(st.sampled_from(sorted(call.metadata)))
        entries = call.metadata[section]
        keep = data.draw(st.sets(st.sampled_from(sorted(entries)))) if entries else set()
        md = {section: {k: entries[k] for k in keep}}
    args = None
    if pick["a"] and call.arguments:
        name = data.draw(st.sampled_from(sorted(call.arguments)))
        args = {name: data.draw(st.sampled_from([call.arguments[name], record.arguments[name]]))}
    return QueryCall(
        name=call.name if pick["n"] else None,
        arguments=args,
        metadata=md,
        module=call.module if pick["m"] else None,
        result=call.result if pick["r"] else None,
    )


def _keys(found: Any) -> list[tuple[str, DigestedCall]]:
    return sorted(((c.to_lookup_key(), c) for c in found), key=lambda kc: kc[0])


@settings(
    max_examples=400 if FULL else 40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls=st.lists(_calls, min_size=1, max_size=6), templates=st.lists(_templates, max_size=3), data=st.data())
@example(  # MariaDB took json_extract(data, '$."Host"') and (..., '$."host"') for one expression
    calls=[Call("f", {}, metadata={"Runtime": {"Host": "h1 ", "host": "h1"}}, result=1)],
    templates=[QueryCall(metadata={"Runtime": {"Host": "h1 ", "host": "h1"}})],
    data=None,  # no derived templates
)
def test_query_equals_generic_query(sql: Sql, calls: list[Call], templates: list[QueryCall], data: Any) -> None:
    for key in sql.list():
        sql.evict(key)
    memory = CallMemory()
    for call in calls:
        assert sql.save(call) == memory.save(call)
    derived = [] if data is None else [
        _template_from(data.draw(st.sampled_from(calls)), data) for _ in range(3)
    ]
    for template in [*templates, *derived, QueryCall()]:
        assert _keys(sql.query(template)) == _keys(memory.query(template)), template


def test_query_pushes_conditions_into_sql(sql: Sql) -> None:
    """Name, arguments, result and scalar metadata become SQL; others stay in Python."""
    sql.save(_call(1))
    pushed = QueryCall(
        name="_f", arguments={"x": 1}, result=1, metadata={"run": {"i": 1, "s": "a", "b": True}}
    )
    conditions = sql._build_call_conditions(pushed)
    assert len(conditions) == 4
    assert len(sql._build_call_conditions(QueryCall(metadata={"run": {"t": (1,)}}))) == 1
    statement = sa.select(sa.literal(1)).where(*conditions)
    text = str(statement.compile(dialect=sql.engine.dialect))
    assert "fleche_metadata" in text and "fleche_arguments" in text
    assert [c.name for c in sql.query(pushed)] == []
    assert [c.arguments["x"] for c in sql.query(QueryCall(metadata={"run": {"i": 1}}))] == [digest(1)]


def _sql_candidates(sql: Sql, template: QueryCall) -> set[str]:
    """The keys the SQL conditions of ``template`` select, before any check in Python."""
    where = sql._build_call_conditions(template)
    with sql._session_scope(Intent.READ) as conn:
        return set(conn.execute(sa.select(calls.c.key).where(*where)).scalars())


def test_entries_differing_in_case_and_trailing_spaces_are_told_apart(sql: Sql) -> None:
    """Conditions on entries whose names differ in case only, with values differing in a
    trailing space only, are each evaluated (MariaDB once dropped or contradicted one of them:
    the template below selected nothing) and compare exactly."""
    one = sql.save(Call("f", {"x": 1}, metadata={"Runtime": {"Host": "h1 ", "host": "h1"}}))
    other = sql.save(Call("f", {"x": 2}, metadata={"Runtime": {"Host": "h1", "host": "h1 "}}))
    both = QueryCall(metadata={"Runtime": {"Host": "h1 ", "host": "h1"}})
    assert _sql_candidates(sql, both) == {one}
    assert [c.arguments for c in sql.query(both)] == [{"x": digest(1)}]
    swapped = QueryCall(metadata={"Runtime": {"Host": "h1", "host": "h1 "}})
    assert _sql_candidates(sql, swapped) == {other}
    assert _sql_candidates(sql, QueryCall(metadata={"Runtime": {"Host": "h1 "}})) == {one}
    assert _sql_candidates(sql, QueryCall(metadata={"Runtime": {"host": "h1"}})) == {one}
    assert _sql_candidates(sql, QueryCall(metadata={"Runtime": {"HOST": "h1"}})) == set()
    assert _sql_candidates(sql, QueryCall(metadata={"Runtime": {"Host": "H1 "}})) == set()


def test_query_takes_a_call_as_template(sql: Sql) -> None:
    """A Call, digested or not, queries as the QueryCall with the same fields."""
    for i in range(6):
        sql.save(_call(i, version=i % 2))
    template = Call("_f", {"y": 1}, module=__name__, version=1)
    expected = _keys(sql.query(QueryCall(name="_f", arguments={"y": 1}, module=__name__, version=1)))
    assert expected and _keys(sql.query(template)) == expected
    assert _keys(sql.query(template.digest().replace(result=None))) == expected
    assert _keys(sql.query(_call(3, version=1))) == _keys([sql.load(_call(3, version=1).to_lookup_key())])
    with pytest.raises(TypeError, match="QueryCall or a Call"):
        list(sql.query({"name": "_f"}))


def test_contains_many_is_one_query_per_batch(sql: Sql) -> None:
    """1200 keys, full and short, stored and not, cost three statements (batches of 500)."""
    stored = [sql.save(_call(i)) for i in range(40)]
    missing = [_call(i).to_lookup_key() for i in range(40, 1200)]
    asked = [*stored[:20], *(k[:10] for k in stored[20:]), *missing]
    statements: list[str] = []
    checkouts: list[int] = []
    sa.event.listen(sql.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    sa.event.listen(sql.engine.pool, "checkout", lambda *a: checkouts.append(1))
    assert sql.contains_many(asked) == set(stored)
    assert len([s for s in statements if "fleche_calls" in s]) == 3 and len(checkouts) <= 3
    with pytest.raises(ValueError, match="too short"):
        sql.contains_many([stored[0], "abc"])


# -- processes ----------------------------------------------------------------------------------


def test_pickles_as_settings_only(sql: Sql) -> None:
    key = sql.save(_call(1))
    blob = pickle.dumps(sql)
    assert b"sqlalchemy" not in blob and len(blob) < 400
    copy = pickle.loads(blob)
    assert copy == sql and copy.engine is None
    assert copy.load(key) == _call(1)
    assert copy.engine is not sql.engine
    _close(copy)


def _backend_id(storage: Sql) -> Any:
    with storage._session_scope(Intent.READ) as s:
        if storage.engine.dialect.name == "postgresql":
            return s.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        if storage.engine.dialect.name == "mysql":
            return s.execute(sa.text("SELECT CONNECTION_ID()")).scalar()
        return id(s.connection.dbapi_connection)


def _forked_child(storage: Sql, key: str, parent_backend: Any, start: Any, out: Any) -> None:
    try:
        start.wait()
        for i in range(40):
            assert storage.load(key) == _call(1)
            storage.save(_call(10 + i % 4))
        out.put(("ok", _backend_id(storage) != parent_backend, storage._connections.pid == os.getpid()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out.put(("error", repr(e), None))


def test_fork_gives_the_child_its_own_connections(sql: Sql) -> None:
    """Parent and forked child work at once; the parent keeps its very connection."""
    key = sql.save(_call(1))
    before = _backend_id(sql)
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(2), ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(sql, key, before, start, out))
    child.start()
    start.wait()
    for _ in range(40):
        assert sql.load(key) == _call(1)
    result = out.get(timeout=120)
    child.join(timeout=60)
    assert result == ("ok", True, True), result
    assert child.exitcode == 0
    assert _backend_id(sql) == before
    assert {sql.load(sql.save(_call(10 + i))).result for i in range(4)} == {digest(10 + i) for i in range(4)}


def _consistent(call: DigestedCall) -> bool:
    w = call.metadata["w"]
    return call.result == digest((w["p"], w["n"]))


def _hammer(url: str, p: int, rounds: int, start: Any, out: Any) -> None:
    """Save overlapping calls with changing result and metadata; check every read is whole."""
    try:
        # Eight processes on two cores queue on the same keys: what is checked here is that
        # nothing is lost or torn, not how long a turn takes (the timeout tests do that).
        storage = Sql(url, lock_timeout=60)
        start.wait()
        saved: list[Digest] = []
        for n in range(rounds):
            i = (p * 7 + n) % 40
            call = Call.from_call(_f, i).replace(result=(p, n), metadata={"w": {"p": p, "n": n}})
            key = storage.save(call)
            saved.append(key)
            loaded = storage.load(key)
            assert loaded.arguments == {"x": digest(i), "y": digest(0)} and _consistent(loaded)
            earlier = storage.load(saved[(n * 31) % len(saved)])  # never missing, never torn
            assert _consistent(earlier)
        _close(storage)
        out.put(("ok", p))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out.put(("error", f"process {p}: {e!r}\n{traceback.format_exc()}"))


@pytest.mark.slow
def test_many_processes_save_overlapping_calls(db_url: str) -> None:
    """8 processes save overlapping calls (200 times each under FLECHE_STRESS=full)."""
    rounds = 200 if FULL else 25
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(db_url, p, rounds, start, out)) for p in range(8)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    errors = [r[1] for r in results if r[0] != "ok"]
    assert not errors, errors[0]
    storage = Sql(db_url)
    expected = {Call.from_call(_f, (p * 7 + n) % 40).to_lookup_key() for p in range(8) for n in range(rounds)}
    assert set(storage.list()) == expected
    for key in expected:
        assert _consistent(storage.load(key))
    _close(storage)


# -- key locks: one deadline, held outside transactions ----------------------------------------

OVERSHOOT_S = 0.2
"""How much later than ``lock_timeout`` a waiter may give up (the issue's generous bound)."""


def _hold_locked(url: str, key: str, ready: Any, release: Any) -> None:
    """Hold ``key``'s ``locked`` section in this process until ``release`` is set."""
    storage = Sql(url, lock_timeout=60)
    with storage.locked(key):
        ready.set()
        release.wait(120)
    _close(storage)


class _Holder:
    """Another process holding ``locked(key)`` until the ``with`` block ends."""

    def __init__(self, url: str, key: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ready, self.release = ctx.Event(), ctx.Event()
        self.process = ctx.Process(target=_hold_locked, args=(url, key, self.ready, self.release))

    def __enter__(self) -> _Holder:
        self.process.start()
        assert self.ready.wait(120), "the holder never took the lock"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self.process.join(120)
        assert self.process.exitcode == 0


def _connection_time(storage: Sql) -> float:
    """How long an uncontended ``locked`` section takes on ``storage`` (warmed up)."""
    free = _call(999).to_lookup_key()
    with storage.locked(free):
        pass
    t0 = time.monotonic()
    with storage.locked(free):
        pass
    return time.monotonic() - t0


def _enter_locked(storage: Sql, key: str) -> None:
    with storage.locked(key):
        pass


def _time_out(section: Any) -> float:
    """Seconds until ``section()`` raised ``LockTimeout``."""
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        section()
    assert info.value.timeout <= 1.0 and "timed out" in str(info.value)
    return time.monotonic() - t0


def test_lock_timeout_is_a_setting(tmp_path: Path) -> None:
    storage = Sql(tmp_path / "a.sqlite", lock_timeout=2.5)
    assert storage.lock_timeout == 2.5 and Sql(tmp_path / "a.sqlite").lock_timeout == 1.0
    assert "lock_timeout=2.5" in repr(storage)
    assert pickle.loads(pickle.dumps(storage)).lock_timeout == 2.5
    assert storage != Sql(tmp_path / "a.sqlite") and Sql(lock_timeout=None).lock_timeout is None
    for bad in (-1, "1", float("nan")):
        with pytest.raises(ValueError, match="lock_timeout"):
            Sql(tmp_path / "a.sqlite", lock_timeout=bad)


def test_a_held_key_times_out_at_one_deadline(db_url: str) -> None:
    """Another process holds a key. Two threads here wait for it, the second behind the first's
    thread lock; each gives up at ``lock_timeout`` in total, and so does a save of the key."""
    timeout = 0.4
    storage = Sql(db_url, lock_timeout=timeout)
    key = storage.save(_call(1))
    bound = timeout + OVERSHOOT_S + _connection_time(storage)
    waited: list[float] = []
    errors: list[BaseException] = []

    def wait_for_key() -> None:
        try:
            waited.append(_time_out(lambda: _enter_locked(storage, key)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with _Holder(db_url, key):
        threads = [threading.Thread(target=wait_for_key) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(waited) == 2 and all(timeout * 0.9 <= w < bound for w in waited), (waited, bound)
        assert timeout * 0.9 <= _time_out(lambda: storage.save(_call(1, result=2))) < bound
        assert timeout * 0.9 <= _time_out(lambda: storage.evict(key)) < bound
    assert storage.load(key) == _call(1)  # nothing changed
    with storage.locked(key):  # free again once the holder is gone
        storage.save(_call(1, result=3))
    assert storage.load(key).result == digest(3)
    _close(storage)


def test_stores_in_two_databases_of_one_server_do_not_share_key_locks() -> None:
    """MariaDB's lock names are one namespace per server: a key held in one database must not
    make the same key wait in another database there, and still excludes within its own."""
    url = _server_url("mariadb")
    here = Sql(url)._sqlalchemy_url()
    other = here.set(database=f"{here.database}_other")
    admin = sa.create_engine(here, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE IF NOT EXISTS `{other.database}`"))
    try:
        mine = Sql(url, lock_timeout=0.2)
        theirs = Sql(other.render_as_string(hide_password=False), lock_timeout=0.2)
        key = mine.save(_call(1))
        assert theirs.save(_call(1)) == key
        with _Holder(url, key):
            with theirs.locked(key):  # another database: free
                theirs.save(_call(1, result=2))
            with pytest.raises(LockTimeout):  # the same database: held
                with mine.locked(key):
                    pass
        _close(mine)
        _close(theirs)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{other.database}`"))
        admin.dispose()


def test_a_dead_holders_lock_is_free(db_url: str) -> None:
    """A process killed inside ``locked(k)`` leaves nothing held: the kernel (SQLite's lock
    files) or the server (a connection that is gone) frees its lock."""
    storage = Sql(db_url, lock_timeout=60)
    key = storage.save(_call(1))
    holder = _Holder(db_url, key)
    holder.process.start()
    assert holder.ready.wait(120)
    holder.process.kill()
    holder.process.join(60)
    with storage.locked(key):
        storage.save(_call(1, result=2))
    assert storage.load(key).result == digest(2)
    _close(storage)


def _save_others(url: str, records: list[DigestedCall], done: Any) -> None:
    storage = Sql(url, lock_timeout=60)
    for record in records:
        storage.save(record)
        assert storage.load(record.to_lookup_key()) == record
    _close(storage)
    done.set()


def test_a_long_section_keeps_no_other_writer_waiting(db_url: str) -> None:
    """While one process holds ``locked(k1)`` (released by an event), another saves other keys
    without waiting for it, and a waiter on ``k1`` gives up at its deadline."""
    from fleche.storage.locks import stripe

    storage = Sql(db_url, lock_timeout=0.3)
    k1 = storage.save(_call(1))
    bound = storage.lock_timeout + OVERSHOOT_S + _connection_time(storage)
    # Keys whose SQLite lock file differs from k1's, so that only the database could hold them up.
    others = [r for r in (_call(i) for i in range(100, 160))
              if stripe(r.to_lookup_key()) != stripe(k1)][:20]
    ctx = multiprocessing.get_context("spawn")
    with _Holder(db_url, k1):
        done = ctx.Event()
        writer = ctx.Process(target=_save_others, args=(db_url, others, done))
        writer.start()
        try:
            assert done.wait(120), "saving other keys waited for the held key"
        finally:
            writer.join(120)
        assert writer.exitcode == 0
        assert _time_out(lambda: _enter_locked(storage, k1)) < bound
        assert storage.load(k1) == _call(1)  # reads never wait
    assert storage.contains_many([r.to_lookup_key() for r in others]) == {
        r.to_lookup_key() for r in others
    }
    _close(storage)


# -- SQLite specifics ---------------------------------------------------------------------------


def test_sqlite_runs_in_wal_mode_with_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite"
    storage = Sql(path)
    storage.save(_call(1))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with storage._session_scope(Intent.READ) as s:
        assert s.execute(sa.text("PRAGMA busy_timeout")).scalar() == 30000
        assert s.execute(sa.text("PRAGMA foreign_keys")).scalar() == 1
    _close(storage)


_READ_ONLY_CHECKS = """
import json, os, sys
import fleche
from fleche.call import QueryCall
from fleche.cli import main
from fleche.errors import DatabaseError, SaveError
from fleche.storage.sql import Sql

spec, path, expected = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cache = fleche.open(spec)
calls = cache.calls
assert sorted(calls.list()) == sorted(expected), calls.list()
for key in expected:
    assert calls.contains(key[:8]) and calls.load(key[:8]).to_lookup_key() == key
    assert cache.load_result(key) is not None
assert len(list(calls.query(QueryCall(name="_f")))) == len(expected)
with calls.locked(expected[0]):
    pass
for argv in (["ls", spec], ["show", spec, expected[0][:8]], ["verify", spec]):
    assert main(argv) == 0, argv
try:
    calls.save(calls.load(expected[0]).replace(version="other"))
except SaveError as e:
    assert path in str(e) and "read-only" in str(e), e
    print("save refused:", e)
else:
    raise AssertionError("saved into a read-only database")
try:
    calls.evict(expected[0])
except DatabaseError as e:
    assert path in str(e) and "read-only" in str(e), e
else:
    raise AssertionError("evicted from a read-only database")
assert sorted(calls.list()) == sorted(expected)
print("read-only checks passed")
"""


def _read_only_store(root: Path, keep_open: bool) -> tuple[str, list[str], Any]:
    """A SQLite store under ``root`` with three calls; optionally a connection kept open
    (so that the WAL's ``-shm`` file exists)."""
    from fleche import open as open_store

    spec = f"sqlite:///{root}/calls.db"
    cache = open_store(spec)
    keys = [cache.save(Call.from_call(_f, i).replace(result=i * 10)) for i in range(3)]
    _close(cache.calls)
    keeper = sqlite3.connect(root / "calls.db") if keep_open else None
    if keeper is not None:
        keeper.execute("SELECT count(*) FROM fleche_calls").fetchall()
    return spec, keys, keeper


def _on_read_only_mount(source: Path, mounted: Path, code: str, *args: str) -> Any:
    """Run the Python ``code`` with ``args`` in a process that sees ``source`` read-only at
    ``mounted`` (a bind mount in a private mount namespace, gone with the process)."""
    import shlex
    import shutil

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root and unshare(1) (a private mount namespace)")
    mounted.mkdir()
    script = mounted.parent / "read_only_checks.py"
    script.write_text(code)
    command = (
        f"mount --bind {source} {mounted} && mount -o remount,bind,ro {mounted} && "
        f"exec {sys.executable} {script} {' '.join(map(shlex.quote, args))}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", command], env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True, text=True, timeout=120,
    )
    if done.returncode != 0 and "mount:" in done.stderr:
        pytest.skip(f"cannot make a read-only bind mount here: {done.stderr.strip()}")
    return done


@pytest.mark.parametrize("keep_open", [False, True], ids=["closed", "open-elsewhere"])
def test_sqlite_store_on_a_read_only_mount_reads(tmp_path: Path, keep_open: bool) -> None:
    """Reading, ``fleche ls``, ``show`` and ``verify`` work on a read-only bind mount of a SQLite
    store; saves and evictions fail naming the file, and nothing is created there."""
    import json

    source, mounted = tmp_path / "store", tmp_path / "ro"
    source.mkdir()
    _, keys, keeper = _read_only_store(source, keep_open)

    def listing() -> list[str]:  # SQLite's own -wal and -shm files come and go
        return sorted(n for n in os.listdir(source) if not n.endswith(("-wal", "-shm")))

    before = listing()
    try:
        done = _on_read_only_mount(
            source, mounted, _READ_ONLY_CHECKS,
            f"sqlite:///{mounted}/calls.db", f"{mounted}/calls.db", json.dumps(keys),
        )
    finally:
        if keeper is not None:
            keeper.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "read-only checks passed" in done.stdout
    assert "read-only filesystem" in done.stdout  # the refused save says why
    assert listing() == before  # nothing was created


def test_a_read_only_schema_2_database_is_refused_clearly(tmp_path: Path) -> None:
    """A schema 2 database that cannot be written cannot be migrated: the error says so."""
    import shutil

    source = tmp_path / "store"
    source.mkdir()
    shutil.copy(_SCHEMA_2, source / "calls.sqlite")
    code = (
        "import sys\nfrom fleche.errors import DatabaseError\nfrom fleche.storage.sql import Sql\n"
        "try:\n    Sql(sys.argv[1]).list()\nexcept DatabaseError as e:\n    print(e)\n"
    )
    done = _on_read_only_mount(source, tmp_path / "ro", code, f"{tmp_path}/ro/calls.sqlite")
    assert done.returncode == 0, done.stderr
    assert (
        f"cannot migrate its fleche tables from schema version 2 to {SCHEMA_VERSION}"
        in done.stdout
    )
    assert "read-only filesystem" in done.stdout and f"{tmp_path}/ro/calls.sqlite" in done.stdout


def test_sqlite_store_without_write_permission_reads(tmp_path: Path) -> None:
    """The same without write permission on the file and its directory (as a user other than
    root: root ignores file permissions)."""
    import json

    if os.geteuid() == 0:
        pytest.skip("running as root, which ignores file permissions; the read-only mount "
                    "test covers the same code path")
    spec, keys, _ = _read_only_store(tmp_path, keep_open=False)
    script = tmp_path / "checks.py"
    script.write_text(_READ_ONLY_CHECKS)
    os.chmod(tmp_path / "calls.db", 0o444)
    os.chmod(tmp_path, 0o555)
    try:
        done = subprocess.run(
            [sys.executable, str(script), spec, str(tmp_path / "calls.db"), json.dumps(keys)],
            env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=120,
        )
    finally:
        os.chmod(tmp_path, 0o755)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no permission to write" in done.stdout


def test_network_filesystems_are_recognised(tmp_path: Path) -> None:
    mounts = (
        "/dev/sda1 / ext4 rw 0 0\n"
        "server:/export /mnt/share nfs4 rw 0 0\n"
        "//host/data /mnt/smb\\040drive cifs rw 0 0\n"
        "tmpfs /mnt/share/local tmpfs rw 0 0\n"
    )
    assert _filesystem_type(Path("/mnt/share/a/b.sqlite"), mounts) == "nfs4"
    assert _filesystem_type(Path("/mnt/smb drive/b.sqlite"), mounts) == "cifs"
    assert _filesystem_type(Path("/mnt/share/local/b"), mounts) == "tmpfs"
    assert _filesystem_type(Path("/mnt/shared"), mounts) == "ext4"
    assert _is_network_filesystem("nfs4") and _is_network_filesystem("cifs")
    assert not _is_network_filesystem("ext4") and not _is_network_filesystem(None)
    assert not _is_network_filesystem(_filesystem_type(tmp_path))


def test_importing_storage_needs_no_sqlalchemy() -> None:
    code = (
        "import sys; sys.modules['sqlalchemy'] = None\n"
        "import fleche.storage as s\n"
        "assert 'Sql' in dir(s)\n"
        "try:\n    s.Sql\nexcept ImportError:\n    print('lazy')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "lazy"
