"""fleche quickstart: a Dask cluster that never computes the same call twice.

Starts a local cluster with two worker processes, registers the fleche plugin on a store in a
temporary directory (pickle files for values, SQLite for call records), runs a parameter sweep
twice and prints the hit rate and both timings.

Run: python3 examples/quickstart.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dask.distributed import Client, LocalCluster

from fleche import fleche
from fleche.caches import Cache
from fleche.dask import FlecheCache
from fleche.storage import Sql, ValuePickleFile


@fleche
def simulate(temperature: float, steps: int = 200_000) -> dict:
    """A stand-in for an expensive simulation: a slow random walk."""
    import random

    rng = random.Random(temperature)
    position = 0.0
    for _ in range(steps):
        position += rng.gauss(0.0, temperature)
    return {"temperature": temperature, "final": position}


def open_store(directory: Path) -> Cache:
    return Cache(ValuePickleFile(root=directory / "values"), Sql(str(directory / "calls.sqlite")))


def sweep(client: Client, temperatures: list[float]) -> tuple[list[dict], float]:
    start = time.perf_counter()
    results = client.gather(client.map(simulate, temperatures, pure=False))
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep the store in this directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        store = open_store(directory)
        temperatures = [0.5 + 0.25 * i for i in range(16)]
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.register_plugin(FlecheCache(store))
            first, cold = sweep(client, temperatures)
            after_first = FlecheCache.stats(client)[["hits", "misses"]].sum()
            second, warm = sweep(client, temperatures)
            assert first == second
            stats = FlecheCache.stats(client)
        total = stats[["hits", "misses"]].sum()
        hits, misses = int(total["hits"] - after_first["hits"]), int(total["misses"] - after_first["misses"])
        print(f"store: {directory}")
        print(f"first sweep:  {cold:6.2f} s  ({int(after_first['misses'])} computed on the workers)")
        print(f"second sweep: {warm:6.2f} s  ({hits} loaded from the store)")
        print(f"hit rate of the second sweep: {hits}/{hits + misses} = {hits / (hits + misses):.0%}; "
              f"{int(stats['bytes_written'].sum())} bytes written by the workers")
        (call,) = store.query(temperature=1.5)
        runtime = call.metadata["runtime"]
        print(f"simulate(1.5) ran on {runtime['host']} pid {runtime['pid']} "
              f"in {runtime['wall_time']:.3f} s; key {store.shrink(call.to_lookup_key())}")


if __name__ == "__main__":
    main()
