"""Single-key reads of ``Sql`` on database servers: autocommit connections that outlive a
killed session, a server restart's lost connections and a fork.

Needs ``FLECHE_TEST_POSTGRES_URL`` / ``FLECHE_TEST_MARIADB_URL`` (an empty database each); every
test drops the fleche tables before and after itself.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from typing import Any

import pytest

sa = pytest.importorskip("sqlalchemy")

from fleche.call import Call, QueryCall  # noqa: E402
from fleche.storage.sql import Sql  # noqa: E402
from test_storage_sql import SERVERS, _drop_tables, _server_url  # noqa: E402


@pytest.fixture(params=sorted(SERVERS))
def server(request: Any) -> Iterator[Sql]:
    """An ``Sql`` on an empty server database of each kind, closed and its tables dropped after."""
    url = _server_url(request.param)
    _drop_tables(url)
    storage = Sql(url)
    yield storage
    storage.close()
    _drop_tables(url)


def _call(i: int) -> Call:
    return Call("area", {"r": i}, metadata={"run": {"host": "h"}}, module="m", result=i * i)


def _session_ids(storage: Sql, n: int = 1) -> list[int]:
    """The server session ids of ``n`` read connections of ``storage`` at once (so ``n`` distinct
    connections, left idle afterwards)."""
    readers = storage._connections.readers
    sql = (
        "SELECT pg_backend_pid()"
        if storage.engine.dialect.name == "postgresql"
        else "SELECT CONNECTION_ID()"
    )

    def ids(k: int) -> list[int]:
        def read(conn: Any) -> list[int]:
            cursor = conn.cursor()
            cursor.execute(sql)
            (own,) = cursor.fetchone()
            cursor.close()
            return [own, *ids(k - 1)] if k > 1 else [own]

        return readers.run(read)

    return ids(n)


def _kill(storage: Sql, sessions: list[int]) -> None:
    """End the server sessions ``sessions`` from another connection, as an admin would."""
    admin = sa.create_engine(storage._sqlalchemy_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for session in sessions:
                if storage.engine.dialect.name == "postgresql":
                    ended = conn.execute(
                        sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": session}
                    ).scalar()
                    assert ended, f"backend {session} was not running"
                else:
                    conn.execute(sa.text(f"KILL {int(session):d}"))
    finally:
        admin.dispose()


def test_a_killed_read_connection_is_replaced(server: Sql) -> None:
    key = server.save(_call(3))
    assert server.load(key).result is not None
    (session,) = _session_ids(server)
    _kill(server, [session])
    assert server.load(key) == server.load(key)  # the first one met the dead connection
    (replacement,) = _session_ids(server)
    assert replacement != session


def _other_sessions(storage: Sql) -> list[int]:
    """Every session on the storage's database but the asking one's."""
    engine = sa.create_engine(storage._sqlalchemy_url())
    sql = (
        "SELECT pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        if storage.engine.dialect.name == "postgresql"
        else "SELECT id FROM information_schema.processlist "
        "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
    )
    try:
        with engine.connect() as conn:
            return [int(row[0]) for row in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


def test_reads_and_writes_survive_every_session_ending(server: Sql) -> None:
    """As after a server restart: every idle read connection and pooled one is dead at once."""
    key = server.save(_call(4))
    readers = _session_ids(server, 3)
    assert len(set(readers)) == 3
    sessions = _other_sessions(server)
    assert set(readers) <= set(sessions)
    _kill(server, sessions)
    assert server.contains(key)
    assert server.load(key).arguments == _call(4).digest().arguments
    other = server.save(_call(5))
    assert server.load(other).result is not None
    assert {c.to_lookup_key() for c in server.query(QueryCall(name="area"))} == {key, other}
    with pytest.raises(KeyError):
        server.load("0" * 64)
    assert set(_session_ids(server, 3)).isdisjoint(sessions)


def test_a_miss_and_contains_after_a_kill(server: Sql) -> None:
    key = server.save(_call(6))
    _kill(server, _session_ids(server))
    assert not server.contains("f" * 64)
    _kill(server, _session_ids(server))
    with pytest.raises(KeyError, match="nothing stored"):
        server.load("e" * 64)
    assert server.contains(key)


def test_threads_share_few_read_connections(server: Sql) -> None:
    """Each read gives its connection back: many threads reading need no more connections
    than read at once, and each reads whole records."""
    keys = [server.save(_call(i)) for i in range(8)]
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        try:
            start.wait()
            for n in range(50):
                assert server.load(keys[(i + n) % 8]).result is not None
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert 1 <= len(server._connections.readers.idle) <= 8


def _child_reads(storage: Sql, key: str, out: Any) -> None:
    try:
        out.put(("ok", storage.load(key).result is not None, _session_ids(storage)))
        storage.close()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out.put(("error", repr(e), None))


def test_a_forked_child_reads_on_its_own_connection(server: Sql) -> None:
    """The child opens its own read connection and, exiting, leaves the parent's alive."""
    key = server.save(_call(7))
    (before,) = _session_ids(server)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(server, key, out))
    child.start()
    status, loaded, child_sessions = out.get(timeout=120)
    child.join(timeout=60)
    assert (status, loaded) == ("ok", True), loaded
    assert child.exitcode == 0
    assert child_sessions != [before]
    assert _session_ids(server) == [before]  # the very same connection, still alive


def test_close_closes_the_read_connections(server: Sql) -> None:
    key = server.save(_call(8))
    server.load(key)
    assert server._connections.readers.idle
    server.close()
    assert server._connections.readers.idle == []
    assert server.load(key).result is not None  # usable again
    other = server.save(_call(9))
    assert {c.to_lookup_key() for c in server.query(QueryCall(name="area"))} == {key, other}


def test_an_in_memory_sqlite_database_reads_what_it_wrote() -> None:
    """Reads of an in-memory database use the engine's connections: a new one would see an
    empty database."""
    storage = Sql("sqlite://")
    try:
        key = storage.save(_call(2))
        assert storage.contains(key)
        assert storage.load(key).arguments == _call(2).digest().arguments
        assert not storage._connections.readers.own
    finally:
        storage.close()
