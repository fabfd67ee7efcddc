"""A Dask cluster whose workers share nothing but an S3 + PostgreSQL store: values as objects
on a real S3 API server (moto's, started here), call records in PostgreSQL
(``FLECHE_TEST_POSTGRES_URL``, which ``.ci/run`` provides)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("distributed", reason="the dask extra is not installed")
pytest.importorskip("sqlalchemy", reason="the sql extra is not installed")
pytest.importorskip("fsspec", reason="the s3 extra is not installed")

from cluster_sweeps import TEMPERATURES, two_sweeps_compute_once  # noqa: E402

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
    two_sweeps_compute_once(spec, tmp_path)

    store = fleche.open(spec)
    assert isinstance(store.values, ValueObjectStore)
    assert len(list(store.list())) == len(TEMPERATURES)  # the records, in PostgreSQL
    objects = s3.client().list_objects_v2(Bucket=bucket, Prefix="values/")["KeyCount"]
    assert objects == len(TEMPERATURES)  # the results, one object each
