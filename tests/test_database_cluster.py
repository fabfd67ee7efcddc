"""A Dask cluster whose workers share nothing but a PostgreSQL database (``FLECHE_TEST_POSTGRES_URL``,
which ``.ci/run`` provides): the store is the database URL alone, values and call records in it."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("distributed", reason="the dask extra is not installed")
pytest.importorskip("sqlalchemy", reason="the sql extra is not installed")

from cluster_sweeps import TEMPERATURES, two_sweeps_compute_once  # noqa: E402
from object_store_tasks import simulate  # noqa: E402

import fleche  # noqa: E402
from fleche.storage import SqlValues  # noqa: E402

POSTGRES = os.environ.get("FLECHE_TEST_POSTGRES_URL")


@pytest.fixture
def spec():
    if not POSTGRES:
        pytest.skip("no PostgreSQL database to test with (set FLECHE_TEST_POSTGRES_URL)")
    from fleche.storage.sql.schema import schema

    def drop() -> None:
        calls = fleche.open(POSTGRES).calls
        calls.list()  # connects
        schema.drop_all(calls.engine)
        calls.engine.dispose()

    drop()
    yield POSTGRES
    drop()


def test_a_second_sweep_on_a_new_cluster_recomputes_nothing(spec, tmp_path):
    two_sweeps_compute_once(spec, tmp_path)

    store = fleche.open(spec)
    assert isinstance(store.values, SqlValues) and store.values.sql is store.calls
    assert len(list(store.list())) == len(TEMPERATURES)  # the records
    results = {store.calls.load(k).result for k in store.list()}
    assert results <= set(store.values.list())  # the results, rows of the same database
    assert simulate.digest(0.5) in set(store.list())
