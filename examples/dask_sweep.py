"""A larger sweep with whole-graph caching: plain functions and arrays, no decorator.

Builds a graph of 200 simulations feeding 20 summaries and one total with ``dask.delayed``,
computes it through ``fleche.dask.cached`` twice (the second time in a new client session, with
fresh random task keys) and once with one input changed: only what depends on the change runs.
Then a ``dask.array`` pipeline runs twice under the ``fleche.dask.caching`` switch: plain
``.compute()`` calls, the second served from the store.

Run: python3 examples/dask_sweep.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
from dask import delayed
from dask.distributed import Client, LocalCluster

from fleche.caches import Cache
from fleche.dask import cached, caching
from fleche.storage import CallPickleFile, ValuePickleFile


def simulate(seed: int, temperature: float) -> float:
    import random

    rng = random.Random(seed)
    return sum(rng.gauss(0.0, temperature) for _ in range(20_000))


def summarize(values: list[float]) -> dict:
    return {"n": len(values), "mean": sum(values) / len(values)}


def total(summaries: list[dict]) -> float:
    return sum(s["mean"] for s in summaries) / len(summaries)


def build(temperature_of_group: dict[int, float]):
    summaries = [
        delayed(summarize)([delayed(simulate)(seed, temperature_of_group[group])
                            for seed in range(group * 10, group * 10 + 10)])
        for group in range(20)
    ]
    return delayed(total)(summaries)


def timed(label: str, collection) -> float:
    start = time.perf_counter()
    value = collection.compute()
    tasks = len(dict(collection.__dask_graph__()))
    print(f"{label:<34} {time.perf_counter() - start:6.2f} s   {tasks:4d} tasks in the graph")
    return value


def array_pipeline():
    x = da.random.RandomState(0).random((2000, 2000), chunks=500)
    return (x @ x.T).std(axis=0)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = Cache(ValuePickleFile(root=root / "values"), CallPickleFile(root=root / "calls"))
        temperatures = {group: 1.0 + group / 10 for group in range(20)}
        # min_seconds=0 stores every simulation, not only the total (the default stores outputs
        # and tasks that take at least 0.1 s), so a changed group recomputes only its own.
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
            with Client(cluster):
                plain = timed("uncached", build(temperatures))
                cold = timed("cached, cold store",
                             cached(build(temperatures), store=store, min_seconds=0))
            with Client(cluster):
                warm = timed("cached, new session, warm store",
                             cached(build(temperatures), store=store, min_seconds=0))
                temperatures[3] = 9.0
                timed("cached, one group changed",
                      cached(build(temperatures), store=store, min_seconds=0))
                assert plain == cold == warm
                print(f"result {warm:.6f}, identical in every run; "
                      f"{len(list(store.list()))} tasks stored")
                arrays = Cache(ValuePickleFile(root=root / "avalues"),
                               CallPickleFile(root=root / "acalls"))
                with caching(arrays):  # plain compute() calls, through the store
                    results = []
                    for label in ("array pipeline, cold", "array pipeline, warm"):
                        start = time.perf_counter()
                        results.append(array_pipeline().compute())
                        print(f"{label:<34} {time.perf_counter() - start:6.2f} s")
                assert np.array_equal(*results)
                print(f"array result identical in both runs; "
                      f"{len(list(arrays.list()))} entries stored (outputs and slow tasks)")

if __name__ == "__main__":
    main()
