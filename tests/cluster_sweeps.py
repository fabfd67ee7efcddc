"""Sweeps of ``object_store_tasks.simulate`` on a new Dask cluster, for the tests of stores whose
workers share nothing but the store (an object store, a database)."""

from __future__ import annotations

import numpy as np
from distributed import Client, LocalCluster

import object_store_tasks as tasks
from fleche.dask import FlecheCache


def sweep(spec: str, workdirs, temperatures) -> tuple[list, int]:
    """Run ``simulate`` over ``temperatures`` on a new two-process cluster whose workers each
    work in a directory of their own; return the results and how often the body ran."""
    with LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None,
        worker_dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        workers = sorted(client.scheduler_info()["workers"])
        for address, directory in zip(workers, workdirs):
            directory.mkdir(exist_ok=True)
            assert client.run(tasks.work_in, str(directory), workers=[address]) == {
                address: str(directory)}
        client.register_plugin(FlecheCache(spec))
        results = client.gather(client.map(tasks.simulate, temperatures, pure=False))
        runs = client.run(tasks.runs_here)
    return results, sum(runs.values())


TEMPERATURES = [0.5 * i for i in range(1, 13)]


def two_sweeps_compute_once(spec: str, tmp_path) -> None:
    """Sweep :data:`TEMPERATURES` on a new cluster, then again on another: the first computes
    each call once, the second nothing (every call a hit, on workers that never computed
    anything), with equal results."""
    first, ran = sweep(spec, [tmp_path / "a", tmp_path / "b"], TEMPERATURES)
    assert ran == len(TEMPERATURES)
    assert all((r == np.linspace(0.0, t, 5000)).all() for r, t in zip(first, TEMPERATURES))
    second, ran_again = sweep(spec, [tmp_path / "c", tmp_path / "d"], TEMPERATURES)
    assert ran_again == 0
    assert all((a == b).all() for a, b in zip(first, second))
