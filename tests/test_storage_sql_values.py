"""SqlValues: values in the database, on SQLite (always), PostgreSQL and MariaDB (when their URLs
are set): the value storage contract, chunked large values, damaged rows, the same transaction
for a call's values and record, and the migration of a schema 3 database.

Set ``FLECHE_TEST_POSTGRES_URL`` / ``FLECHE_TEST_MARIADB_URL`` to an empty database each;
every test drops the fleche tables before and after itself.
"""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

sa = pytest.importorskip("sqlalchemy")

from fleche.caches import Cache  # noqa: E402
from fleche.call import Call  # noqa: E402
from fleche.digest import digest  # noqa: E402
from fleche.errors import SaveError, SignatureError  # noqa: E402
from fleche.storage import SqlValues  # noqa: E402
from fleche.storage.base import Intent  # noqa: E402
from fleche.storage.pickle_file import SECRET_KEY_ENV  # noqa: E402
from fleche.storage.sql import CHUNK_BYTES, SCHEMA_VERSION, Sql  # noqa: E402
from fleche.storage.sql.schema import value_chunks, values, versions  # noqa: E402
from test_storage_sql import _close, _drop_tables, _server_url  # noqa: E402

from fleche.testing import (  # noqa: E402
    CacheTests,
    ValueStorageTests,
    assert_corrupt_entry_is_reported_and_evictable,
    flip_a_byte_of_row,
)


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: Any) -> None:
    monkeypatch.setenv(SECRET_KEY_ENV, "none")


def _url(kind: str, tmp_path: Path) -> str:
    return str(tmp_path / "store.sqlite") if kind == "sqlite" else _server_url(kind)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db_url(request: Any, tmp_path: Path) -> Any:
    url = _url(request.param, tmp_path)
    _drop_tables(url)
    yield url
    _drop_tables(url)


@pytest.fixture
def store(db_url: str) -> Any:
    """A store whose values and calls are in one database, as ``fleche.open(URL)`` makes it."""
    calls = Sql(db_url)
    yield Cache(SqlValues(calls), calls)
    _close(calls)


# -- the contracts ------------------------------------------------------------------------------


class _ValuesContract(ValueStorageTests):
    shared_between_processes = True
    kind = ""

    def make_storage(self, tmp_path: Path) -> SqlValues:
        return SqlValues(_url(self.kind, tmp_path))

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Any:
        url = _url(self.kind, tmp_path)
        _drop_tables(url)
        storage = SqlValues(url)
        yield storage
        _close(storage.sql)
        _drop_tables(url)


class TestSqlValuesSqlite(_ValuesContract):
    kind = "sqlite"


class TestSqlValuesPostgres(_ValuesContract):
    kind = "postgresql"


class TestSqlValuesMariaDB(_ValuesContract):
    kind = "mariadb"


class TestSignedSqlValues(_ValuesContract):
    kind = "sqlite"

    def make_storage(self, tmp_path: Path) -> SqlValues:
        return SqlValues(_url(self.kind, tmp_path), secret_key=[b"new", "old"])


class _CacheContract(CacheTests):
    kind = ""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Any:
        url = _url(self.kind, tmp_path)
        _drop_tables(url)
        calls = Sql(url)
        yield Cache(SqlValues(calls), calls)
        _close(calls)
        _drop_tables(url)

    def wrap(self, store: Cache) -> Cache:
        return store


class TestDatabaseOnlyCacheSqlite(_CacheContract):
    kind = "sqlite"


class TestDatabaseOnlyCachePostgres(_CacheContract):
    kind = "postgresql"


class TestDatabaseOnlyCacheMariaDB(_CacheContract):
    kind = "mariadb"


# -- rows -------------------------------------------------------------------------------------


def _rows(storage: SqlValues, key: str) -> tuple[Any, list[Any]]:
    with storage.sql.engine.connect() as conn:
        row = conn.execute(sa.select(values).where(values.c.key == key)).first()
        chunks = conn.execute(
            sa.select(value_chunks.c.n, sa.func.length(value_chunks.c.data))
            .where(value_chunks.c.key == key).order_by(value_chunks.c.n)
        ).all()
    return row, chunks


def test_large_values_are_chunked_and_read_whole(store: Cache) -> None:
    """A value of 2.5 chunks is one row and two chunk rows, none longer than a chunk; it loads
    equal, and replacing it by a small one leaves no chunk behind."""
    storage = store.values
    big = bytes(range(256)) * (CHUNK_BYTES * 5 // 2 // 256)
    key = storage.save(big)
    row, chunks = _rows(storage, key)
    assert row.chunks == 3 and len(row.data) == CHUNK_BYTES
    assert [n for n, _ in chunks] == [1, 2] and all(size <= CHUNK_BYTES for _, size in chunks)
    assert row.size == len(row.data) + sum(size for _, size in chunks)
    assert storage.load(key) == big
    storage.save(b"small", key)
    row, chunks = _rows(storage, key)
    assert row.chunks == 1 and chunks == [] and storage.load(key) == b"small"


def test_a_flipped_byte_reads_as_corrupt(store: Cache) -> None:
    storage = store.values
    key = storage.save(list(range(100)), digest("flipped"))
    flip_a_byte_of_row(storage, key)
    assert_corrupt_entry_is_reported_and_evictable(
        storage, key, storage._location(key), "checksum mismatch"
    )


def test_a_missing_chunk_reads_as_torn(store: Cache) -> None:
    storage = store.values
    key = storage.save(b"x" * (2 * CHUNK_BYTES + 10))
    with storage.sql.engine.begin() as conn:
        conn.execute(sa.delete(value_chunks).where(value_chunks.c.key == key, value_chunks.c.n == 1))
    assert_corrupt_entry_is_reported_and_evictable(
        storage, key, storage._location(key), r"torn entry: .* in 1 of 3 chunks"
    )
    row, chunks = _rows(storage, key)
    assert row is None and chunks == []


def test_a_value_from_another_row_is_refused_when_signed(db_url: str) -> None:
    calls = Sql(db_url)
    storage = SqlValues(calls, secret_key="k")
    a, b = storage.save("a"), storage.save("b")
    with calls.engine.begin() as conn:
        row = conn.execute(sa.select(values.c.header, values.c.data).where(values.c.key == a)).one()
        conn.execute(
            sa.update(values).where(values.c.key == b).values(header=row.header, data=row.data)
        )
    with pytest.raises(SignatureError, match=b):
        storage.load(b)
    assert storage.load(a) == "a"
    _close(calls)


def test_settings_travel_and_compression_applies(db_url: str) -> None:
    calls = Sql(db_url)
    storage = SqlValues(calls, serializer="cloudpickle", compression="zlib")
    key = storage.save(lambda x: x + 1)
    copy = pickle.loads(pickle.dumps(storage))
    assert copy == storage and copy.sql == calls and copy.load(key)(1) == 2
    text = b"abc" * 100_000
    row, _ = _rows(storage, storage.save(text))
    assert row.size < len(text) // 10
    assert "secret" not in repr(SqlValues(calls, secret_key="secret"))
    _close(calls)
    _close(copy.sql)


# -- one transaction ----------------------------------------------------------------------------


def test_values_and_record_commit_together(store: Cache) -> None:
    """While a save of a call with a large value is inside its transaction, another thread
    (its own connection) sees neither the value nor the record; after it, both."""
    call = Call("f", {"x": "y" * 10_000}, result=[b"a" * 100_000, b"b" * 100_000, 3])
    key = call.digest().to_lookup_key()
    inside, release = threading.Event(), threading.Event()
    seen: list[Any] = []
    calls = store.calls
    original = calls.save

    def save_and_wait(record: Any) -> Any:
        result = original(record)
        inside.set()
        assert release.wait(60)
        return result

    def look() -> None:
        assert inside.wait(60)
        reader = Sql(calls.url)  # its own connections: sees what is committed only
        seen.append((reader.contains(key), SqlValues(reader).contains(call.digest().result)))
        _close(reader)
        release.set()

    object.__setattr__(calls, "save", save_and_wait)
    try:
        thread = threading.Thread(target=look)
        thread.start()
        store.save(call)
        thread.join()
    finally:
        object.__delattr__(calls, "save")
    assert seen == [(False, False)]
    assert store.load_result(key) == call.result


def test_a_failing_save_commits_no_value(store: Cache) -> None:
    """A call whose result cannot be pickled leaves neither its stored argument nor a record."""
    argument = "z" * 10_000
    with pytest.raises(SaveError, match="result"):
        store.save(Call("f", {"x": argument}, result=lambda: 1))
    assert not store.values.contains(digest(argument)) and list(store.calls.list()) == []


def test_a_value_storage_on_another_sql_writes_on_its_own(db_url: str) -> None:
    """An equal but separate Sql is not the same connections: save_together runs the writes
    as they are (values first), and the store works."""
    calls = Sql(db_url)
    values_storage = SqlValues(Sql(db_url))
    cache = Cache(values_storage, calls)
    key = cache.save(Call("f", {"x": "w" * 5000}, result="r" * 5000))
    assert cache.load_result(key) == "r" * 5000
    _close(calls)
    _close(values_storage.sql)


# -- schema -------------------------------------------------------------------------------------


def test_a_schema_3_database_gets_the_value_tables(db_url: str, tmp_path: Path) -> None:
    """A database of schema 3 (no value tables) keeps its calls and its values directory, and
    takes values in the database after it migrated to schema 4 on opening."""
    from fleche.storage import ValuePickleFile

    old = Cache(ValuePickleFile(tmp_path / "values"), Sql(db_url))
    key = old.save(Call("f", {"x": 1}, result="q" * 5000))
    _close(old.calls)
    engine = sa.create_engine(Sql(db_url)._sqlalchemy_url())
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE fleche_value_chunks"))
            conn.execute(sa.text("DROP TABLE fleche_values"))
            conn.execute(sa.update(versions).values(value=3))
    finally:
        engine.dispose()
    again = Cache(ValuePickleFile(tmp_path / "values"), Sql(db_url))
    assert again.load_result(key) == "q" * 5000
    both = Cache(SqlValues(again.calls), again.calls)
    other = both.save(Call("g", {"x": 2}, result="s" * 5000))
    assert both.load_result(other) == "s" * 5000
    with again.calls.engine.connect() as conn:
        assert conn.execute(sa.select(versions.c.value)).scalar() == SCHEMA_VERSION == 4
    _close(again.calls)


# -- memory and processes -------------------------------------------------------------------------


def test_a_large_value_is_never_held_twice_while_written_or_read(db_url: str) -> None:
    """Saving a value of five chunks holds its pickle (whose writer over-allocates by up to a
    half as it grows) and a chunk or two, never a second copy of the pickle; loading holds the
    one buffer the chunks are read into and the value made from it, on every driver."""
    import tracemalloc

    calls = Sql(db_url)
    storage = SqlValues(calls)
    storage.save(b"warm up")  # connects and creates the tables outside the measurement
    size = 5 * CHUNK_BYTES - 1000
    big = os.urandom(size)
    tracemalloc.start()
    try:
        key = storage.save(big)
        _, saving = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loaded = storage.load(key)
        _, loading = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loaded == big
    # PyMySQL has no binary parameters: it writes a chunk into the statement as hex text, held
    # as a str, the statement and its bytes (about eight chunks at once, whatever the value's
    # size: the same for values of 5 and 10 chunks).
    in_flight = 8 if db_url.startswith("mysql") else 2
    assert saving < 1.5 * size + in_flight * CHUNK_BYTES, saving
    assert loading < 2 * size + 3 * CHUNK_BYTES, loading
    _close(calls)


def test_postgres_sends_value_rows_in_binary_format(tmp_path: Path) -> None:
    """Through psycopg 3 a value's rows (its first row and its chunks, read through a
    server-side cursor) are asked for in PostgreSQL's binary format, bytes as bytes rather than
    as hex text; other statements keep the text format, and the value loads equal."""
    url = _server_url("postgresql")
    _drop_tables(url)
    calls = Sql(url)
    storage = SqlValues(calls)
    big = os.urandom(2 * CHUNK_BYTES + 10)
    key = storage.save(big)
    seen: list[tuple[str, Any, list[int]]] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # The format the cursor asks for (a server-side one's FETCHes too), and that of the
        # columns that came (a server-side cursor has none yet: its DECLARE returns no rows).
        result = cursor.pgresult
        formats = [result.fformat(i) for i in range(result.nfields)] if result else []
        seen.append((" ".join(statement.split()[:3]), cursor.format, formats))

    sa.event.listen(calls.engine, "after_cursor_execute", record)
    try:
        assert storage.load(key) == big
        with calls._session_scope(Intent.READ) as conn:  # on the engine, reading no payload
            conn.execute(sa.select(sa.literal_column("1")))
    finally:
        sa.event.remove(calls.engine, "after_cursor_execute", record)
        _close(calls)
        _drop_tables(url)
    from psycopg import pq

    binary, text = pq.Format.BINARY, pq.Format.TEXT
    assert [(s, f) for s, f, _ in seen] == [
        ("SELECT fleche_values.header, fleche_values.size,", binary),
        ("SELECT fleche_value_chunks.n, fleche_value_chunks.data", binary),
        ("SELECT 1", text),
    ], seen
    assert seen[0][2] == [binary] * 4 and seen[2][2] == [text], seen


def _save_sharing_a_value(url: str, i: int, argument: str, start: Any) -> None:
    calls = Sql(url, lock_timeout=60)
    cache = Cache(SqlValues(calls, lock_timeout=60), calls, inline_bytes=0)
    start.wait(60)
    for n in range(5):
        cache.save(Call("f", {"x": argument, "i": i * 100 + n}, result=(i, n)))
    _close(calls)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mariadb"])
def test_processes_saving_calls_that_share_a_new_value(kind: str, tmp_path: Path) -> None:
    """Four processes at once save calls whose argument is the same new value, each call in one
    transaction with its values: the conflicting inserts are retried, every call is stored and
    the value is stored once."""
    import multiprocessing

    url = _url(kind, tmp_path)
    _drop_tables(url)
    argument = "shared " * 2000
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [
        ctx.Process(target=_save_sharing_a_value, args=(url, i, argument, start)) for i in range(4)
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(120)
    try:
        assert [w.exitcode for w in workers] == [0] * 4
        calls = Sql(url)
        store = Cache(SqlValues(calls), calls)
        assert len(list(store.list())) == 20
        assert digest(argument) in set(store.values.list())
        assert {store.load(k).arguments["x"] for k in store.list()} == {argument}
        _close(calls)
    finally:
        _drop_tables(url)
