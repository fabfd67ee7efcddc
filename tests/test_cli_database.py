"""The ``fleche`` command line on stores that are a database URL alone (values in the database):
a real PostgreSQL or MariaDB (``FLECHE_TEST_POSTGRES_URL`` / ``FLECHE_TEST_MARIADB_URL``, skipped
where unset) and a SQLite file."""

from __future__ import annotations


import pytest

sa = pytest.importorskip("sqlalchemy")

from test_cli import WIDTH, populate, run, run_here, run_json, spec_for, tasks  # noqa: E402

import fleche  # noqa: E402
from fleche.call import Call  # noqa: E402
from fleche.storage import SqlValues  # noqa: E402
from fleche.storage.sql import CHUNK_BYTES  # noqa: E402
from fleche.storage.sql.schema import values  # noqa: E402
from fleche.testing import flip_a_byte_of_row  # noqa: E402

from test_storage_sql import _drop_tables, _server_url  # noqa: E402


@pytest.fixture(autouse=True)
def _columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.delenv("FLECHE_CACHE", raising=False)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def database(request, tmp_path):
    """The spec of an empty store that is a database alone."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    url = _server_url(request.param)
    _drop_tables(url)
    yield url
    _drop_tables(url)


def _value_rows(spec: str) -> int:
    calls = fleche.open(spec).calls
    try:
        with calls._connect().engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(values)).scalar_one()
    finally:
        calls.engine.dispose()


def test_copy_a_directory_store_into_the_database_and_back(database, tmp_path):
    """A laptop's directory store into a database-only store, inspected there, and back."""
    laptop = spec_for("pickle", tmp_path)
    populate(laptop)
    big = Call("big", {"n": 1}, result=bytes(range(256)) * (CHUNK_BYTES * 3 // 2 // 256))
    big_key = fleche.open(laptop).save(big)  # 1.5 chunks; the other values are small
    done = run("copy", laptop, database)
    assert done.stdout.startswith("copied 7 calls") and "(0 already there)" in done.stdout
    assert run_json("copy", laptop, database, here=True) == {"copied": 0, "already_there": 7}
    store = fleche.open(database)
    assert isinstance(store.values, SqlValues) and store.values.sql is store.calls
    assert store.values.contains(big.digest().result)  # small values live in the records
    assert store.load_result(big_key) == big.result

    info = run_json("info", database, here=True)
    assert info["n_calls"] == 7 and info["n_values"] == _value_rows(database)
    assert info["values_in"] == "pickle entries in the same database (table fleche_values)"
    assert info["functions"] == run_json("info", laptop, here=True)["functions"]
    assert info["size_bytes"] > 0
    (two,) = run_json("ls", database, "--where", "x=2", here=True)
    assert two["arguments"] == {"x": 2}
    shown = run_json("show", database, two["short_key"], here=True)
    assert shown["result"]["value"] == 4 and shown["key"] == tasks.square.digest(2)
    assert run("verify", database).stdout.startswith("checked 7 calls")

    back = str(tmp_path / "back")
    assert run_here("copy", database, back).stdout.startswith("copied 7 calls")
    home = fleche.open(back)
    assert home.load_result(big_key) == big.result
    assert home.load_result(tasks.square.digest(3)) == 9
    simulated = home.load_result(tasks.simulate.digest(1.5))
    assert simulated["temperature"] == 1.5 and list(simulated["trace"]) == [0.0, 0.75, 1.5]
    run_here("verify", back)


def test_verify_finds_a_corrupt_value_row_and_gc_removes_unreferenced_rows(database):
    populate(database)
    cache = fleche.open(database)
    value_of_2 = cache.calls.load(tasks.square.digest(2)).arguments["x"]
    flip_a_byte_of_row(cache.values, value_of_2)
    report = run_json("verify", database, status=1)
    problems = {(p["kind"], p["where"], p["key"]) for p in report["problems"]}
    assert ("corrupt", "value", value_of_2) in problems
    assert ("dangling", "call", tasks.square.digest(2)) in problems
    assert "checksum mismatch" in run_here("verify", database, status=1).stdout
    run("verify", database, "--repair")
    run_here("verify", database)
    with fleche.cache(fleche.open(database)):  # the decorator computes the evicted call again
        assert tasks.square(2) == 4

    (one,) = run_json("ls", database, "--where", "x=1", here=True)
    rows = _value_rows(database)
    run_here("evict", database, one["key"])
    dry = run_json("gc", database, "--dry-run", here=True)
    assert dry["values"] and _value_rows(database) == rows
    assert run_json("gc", database)["values"] == dry["values"]
    assert _value_rows(database) == rows - len(dry["values"])
    assert run_json("gc", database, here=True)["values"] == []
    run_here("verify", database)
    assert fleche.open(database).load_result(tasks.square.digest(3)) == 9
