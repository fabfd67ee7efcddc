"""Fixtures shared by several test modules."""

import pytest

# The local S3 server fixtures (s3_server, s3, bucket) for every module that asks for them.
pytest_plugins = ["s3_support"]


@pytest.fixture(scope="module")
def cluster():
    """A real two-worker LocalCluster with worker processes, one per test module."""
    distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None,
        worker_dashboard_address=None,
    ) as cluster:
        yield cluster
