"""What caching costs cold and saves warm on a two-worker LocalCluster.

Two workloads, each run uncached, then cold (an empty store: compute and save) and warm (the
same pipeline built again, with new task names: load what is stored):

- a sweep of ``--tasks`` small tasks of ``--work-ms`` busy time each: through the
  ``FlecheCache`` plugin (``@fleche`` functions, against uncached ``client.map``), and as a
  ``delayed`` graph through ``fleche.dask.cached`` (against the uncached graph) with the default
  storing rule (the output is saved, the 5 ms tasks are not) and with ``min_seconds=0`` (every
  task saved, so a sweep with one changed point recomputes only that point);
- a ``dask.array`` pipeline: an ``--size`` x ``--size`` random matrix in 8 x 8 chunks, ``x @
  x.T`` and three reductions of it, through ``cached`` and through the ``caching`` switch.

Prints each time and its ratio to the uncached run, then, over ``--rounds`` repetitions, the
fastest time of each run and the ratio of the fastest times; ``--json`` writes them. The load
average (``os.getloadavg``) is printed first: the machine may be shared.

Run: python3 benchmarks/dask_rerun.py [--tasks 1000] [--work-ms 5] [--size 4000] [--rounds 1]
     [--dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from dask import delayed
from dask.distributed import Client, LocalCluster

from fleche import fleche
from fleche.caches import Cache
from fleche.dask import FlecheCache, cached, caching
from fleche.storage import CallPickleFile, ValuePickleFile


def task(i: int, work: float) -> dict:
    end = time.perf_counter() + work  # a stand-in for a small computation
    while time.perf_counter() < end:
        pass
    return {"i": i, "value": i * 0.5}


cached_task = fleche(task)


def file_store(root: Path) -> Cache:
    return Cache(ValuePickleFile(root / "values"), CallPickleFile(root / "calls"))


class Table:
    """Times runs and prints each with its ratio to a baseline run of the same workload and
    round; :meth:`summary` gives the fastest of the rounds (the least disturbed by others)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], list[float]] = {}
        self.baselines: dict[tuple[str, str], str] = {}

    def time(self, workload: str, label: str, run, baseline: str | None = None) -> object:
        start = time.perf_counter()
        value = run()
        seconds = time.perf_counter() - start
        self.seconds.setdefault((workload, label), []).append(seconds)
        text = ""
        if baseline is not None:
            self.baselines[workload, label] = baseline
            text = f"{seconds / self.seconds[workload, baseline][-1]:6.2f}x {baseline}"
        print(f"{workload:<6} {label:<40} {seconds:7.2f} s   {text}", flush=True)
        return value

    def summary(self) -> list[dict]:
        rows = []
        for (workload, label), runs in self.seconds.items():
            row = {"workload": workload, "run": label, "seconds": min(runs), "rounds": runs}
            baseline = self.baselines.get((workload, label))
            if baseline is not None:
                row["baseline"] = baseline
                row["ratio"] = min(runs) / min(self.seconds[workload, baseline])
            rows.append(row)
        return rows


def sweep_runs(table: Table, client: Client, root: Path, n: int, work: float) -> None:
    def sweep():  # built anew each time: fresh random delayed keys
        return delayed(list)([delayed(task)(i, work) for i in range(n)])

    mapped, graph = "uncached client.map", "uncached delayed"
    table.time("sweep", mapped, lambda: client.gather(
        client.map(task, range(n), work=work, pure=False)))
    table.time("sweep", graph, lambda: sweep().compute())
    plugin = FlecheCache(file_store(root / "plugin"))
    client.register_plugin(plugin)
    for phase in ("cold", "warm"):
        table.time("sweep", f"FlecheCache plugin, {phase}", lambda: client.gather(
            client.map(cached_task, range(n), work=work, pure=False)), mapped)
    client.unregister_worker_plugin(plugin.name)
    for label, options in (("cached()", {}), ("cached(min_seconds=0)", {"min_seconds": 0})):
        store = file_store(root / label)
        for phase in ("cold", "warm"):
            table.time("sweep", f"{label}, {phase}",
                       lambda: cached(sweep(), store=store, **options).compute(), graph)
        print(f"       {label}: {len(list(store.list()))} entries")


def array_runs(table: Table, root: Path, size: int) -> None:
    chunk = size // 8

    def pipeline():
        x = da.random.RandomState(0).random((size, size), chunks=chunk)
        y = x @ x.T
        return y.sum(axis=0), y.mean(), y.std(axis=1)

    def same(a, b, exact):  # float matmuls on workers may differ in the last bit between runs
        return all((np.array_equal if exact else np.allclose)(x, y) for x, y in zip(a, b))

    plain = table.time("array", "uncached", lambda: dask.compute(*pipeline()))
    table.time("array", "uncached again", lambda: dask.compute(*pipeline()), "uncached")
    def through_cached(store: Cache) -> tuple:
        return dask.compute(*cached(*pipeline(), store=store))

    def through_switch(store: Cache) -> tuple:
        with caching(store):
            return dask.compute(*pipeline())

    for label, run in (("cached()", through_cached), ("caching() switch", through_switch)):
        store = file_store(root / label)
        cold, warm = (table.time("array", f"{label}, {phase}", lambda: run(store), "uncached")
                      for phase in ("cold", "warm"))
        assert same(cold, plain, exact=False) and same(warm, cold, exact=True)
        print(f"       {label}: {len(list(store.list()))} entries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--work-ms", type=float, default=5.0, help="busy time per sweep task")
    parser.add_argument("--size", type=int, default=4000, help="side of the array's matrix")
    parser.add_argument("--dir", help="where to keep the stores (default: a temporary dir)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--skip", choices=("sweep", "array"), help="leave one workload out")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything, keep the fastest")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    table = Table()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                          worker_dashboard_address=None) as cluster:
            with Client(cluster) as client:
                client.submit(task, -1, 0).result()  # workers warm
                for round_ in range(args.rounds):
                    root = Path(tmp) / f"round-{round_}"
                    if args.skip != "sweep":
                        sweep_runs(table, client, root, args.tasks, args.work_ms / 1000)
                    if args.skip != "array":
                        array_runs(table, root, args.size)
    rows = table.summary()
    print(f"\nfastest of {args.rounds} round(s):")
    for row in rows:
        ratio = f"{row['ratio']:6.2f}x {row['baseline']}" if "ratio" in row else ""
        print(f"{row['workload']:<6} {row['run']:<40} {row['seconds']:7.2f} s   {ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"load_average": load, "tasks": args.tasks, "work_ms": args.work_ms,
             "size": args.size, "rounds": args.rounds, "rows": rows}, indent=2) + "\n")

if __name__ == "__main__":
    main()
