"""A Dask cluster whose workers share nothing but an S3 + PostgreSQL store: values as objects
on a real S3 API server (moto's, started here), call records in PostgreSQL
(``FLECHE_TEST_POSTGRES_URL``, which ``.ci/run`` provides)."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("distributed", reason="the dask extra is not installed")
pytest.importorskip("sqlalchemy", reason="the sql extra is not installed")
pytest.importorskip("fsspec", reason="the s3 extra is not installed")

from cluster_sweeps import sweep  # noqa: E402

import fleche  # noqa: E402
from fleche.storage import ValueObjectStore  # noqa: E402

POSTGRES = os.environ.get("FLECHE_TEST_POSTGRES_URL")


@pytest.fixture
def spec(bucket):
    if not POSTGRES:
        pytest.skip("no PostgreSQL database to test with (set FLECHE_TEST_POSTGRES_URL)")
    from fleche.storage.sql.schema import schema

    spec = f"{POSTGRES}?values=s3://{bucket}/values"

    def drop() -> None:
        calls = fleche.open(spec).calls
        calls.list()  # connects
        schema.drop_all(calls.engine)
        calls.engine.dispose()

    drop()
    yield spec
    drop()


def test_a_second_sweep_on_a_new_cluster_recomputes_nothing(spec, bucket, s3, tmp_path):
    temperatures = [0.5 * i for i in range(1, 13)]
    first, ran = sweep(spec, [tmp_path / "a", tmp_path / "b"], temperatures)
    assert ran == len(temperatures)
    assert all((r == np.linspace(0.0, t, 5000)).all() for r, t in zip(first, temperatures))

    second, ran_again = sweep(spec, [tmp_path / "c", tmp_path / "d"], temperatures)
    assert ran_again == 0  # every call was a hit, on workers that never computed anything
    assert all((a == b).all() for a, b in zip(first, second))

    store = fleche.open(spec)
    assert isinstance(store.values, ValueObjectStore)
    assert len(list(store.list())) == len(temperatures)  # the records, in PostgreSQL
    objects = s3.client().list_objects_v2(Bucket=bucket, Prefix="values/")["KeyCount"]
    assert objects == len(temperatures)  # the results, one object each
