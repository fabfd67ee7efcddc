"""Whole-graph caching of every Dask collection, on a real LocalCluster and the threaded scheduler."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from dask import delayed

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
pytest.importorskip("pyarrow", reason="dask.dataframe needs pyarrow (the dask extra)")
import dask.array as da  # noqa: E402
import dask.bag as db  # noqa: E402
import dask.dataframe as dd  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

import dask_tasks as tasks  # noqa: E402
from fleche.caches import Cache  # noqa: E402
from fleche.dask import cached  # noqa: E402
from fleche.storage import CallPickleFile, ValuePickleFile  # noqa: E402

KINDS = ["array", "frame", "bag", "delayed"]
TESTS = Path(__file__).parent
FRESH_PROCESS = "import sys, dask_tasks; dask_tasks.compute_in_fresh_process(*sys.argv[1:])"


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None,
        worker_dashboard_address=None,
    ) as cluster:
        yield cluster


@pytest.fixture(params=["distributed", "threads"])
def scheduler(request, cluster):
    """The scheduler a test computes on: the cluster (a default client) or local threads."""
    if request.param == "distributed":
        with Client(cluster):
            yield cluster.scheduler_address
    else:
        with dask.config.set(scheduler="threads"):
            yield "threads"


def file_cache(path):
    return Cache(ValuePickleFile(root=path / "values"), CallPickleFile(root=path / "calls"))


def assert_same(a, b):
    """Equal values of the same type, bit for bit for arrays and frames."""
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    elif isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b, check_exact=True)
    else:
        assert a == b


def in_fresh_process(kind, log, root, scheduler):
    """The pipeline built and computed through the store by a new Python process."""
    out = root / f"result-{kind}.pickle"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, kind, log, str(root / "store"), scheduler, str(out)],
        check=True, env=env, timeout=180,
    )
    with open(out, "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_is_served_warm_in_a_fresh_process(kind, scheduler, tmp_path):
    log = str(tmp_path / "runs.log")
    plain = tasks.build(kind, log).compute()
    uncached_runs = len(tasks.runs(log))
    assert uncached_runs > 0
    cold = cached(tasks.build(kind, log), store=file_cache(tmp_path / "store")).compute()
    assert_same(cold, plain)
    assert len(tasks.runs(log)) == 2 * uncached_runs  # cold: every stage ran once more
    warm = in_fresh_process(kind, log, tmp_path, scheduler)
    assert_same(warm, plain)
    assert len(tasks.runs(log)) == 2 * uncached_runs  # warm: no task body ran
