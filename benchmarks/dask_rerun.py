"""A sweep of small tasks on a LocalCluster: what caching costs cold and saves warm.

Four runs of the same sweep of ``--tasks`` small tasks on a two-worker ``LocalCluster``:
uncached; cold with the ``FlecheCache`` plugin (every task computes and saves); warm with the
plugin (every task loads); warm through ``fleche.dask.cached`` (the graph is culled to loads
before it is sent). Prints the times and the ratios to the uncached run.

Run: python3 benchmarks/dask_rerun.py [--tasks 1000] [--work-ms 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dask import delayed
from dask.distributed import Client, LocalCluster

from fleche import fleche
from fleche.caches import Cache
from fleche.dask import FlecheCache, cached
from fleche.storage import CallPickleFile, ValuePickleFile

WORK_SECONDS = 0.005


def task(i: int, work: float) -> dict:
    end = time.perf_counter() + work  # a stand-in for a small computation
    while time.perf_counter() < end:
        pass
    return {"i": i, "value": i * 0.5}


cached_task = fleche(task)


def timed(label: str, run, baseline: float | None = None) -> float:
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    ratio = f"{seconds / baseline:6.2f}x uncached" if baseline else ""
    print(f"{label:<36} {seconds:7.2f} s   {ratio}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--work-ms", type=float, default=5.0, help="busy time per task")
    parser.add_argument("--dir", help="where to keep the store (default: a temporary dir)")
    args = parser.parse_args()
    work = args.work_ms / 1000
    n = args.tasks
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        store = Cache(ValuePickleFile(root / "values"), CallPickleFile(root / "calls"))
        graph_store = Cache(ValuePickleFile(root / "gv"), CallPickleFile(root / "gc"))
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
            with Client(cluster) as client:
                client.submit(task, -1, 0).result()  # workers warm
                base = timed("uncached", lambda: client.gather(
                    client.map(task, range(n), work=work, pure=False)))
                client.register_plugin(FlecheCache(store))
                timed("plugin, cold (compute and save)", lambda: client.gather(
                    client.map(cached_task, range(n), work=work, pure=False)), base)
                timed("plugin, warm (all hits)", lambda: client.gather(
                    client.map(cached_task, range(n), work=work, pure=False)), base)
                stats = FlecheCache.stats(client)

                def sweep():
                    return delayed(list)([delayed(task)(i, work) for i in range(n)])

                timed("cached(), cold", lambda: cached(sweep(), store=graph_store).compute(), base)
                timed("cached(), warm (culled to loads)",
                      lambda: cached(sweep(), store=graph_store).compute(), base)
        print(f"plugin hits {int(stats['hits'].sum())}, misses {int(stats['misses'].sum())}, "
              f"saves {int(stats['saves'].sum())}, "
              f"load {stats['load_seconds'].sum():.2f} s, save {stats['save_seconds'].sum():.2f} s")


if __name__ == "__main__":
    main()
