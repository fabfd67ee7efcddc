"""What caching costs an ``async def`` function against a plain one: hits and misses, on a
memory store and a pickle-file store, run inside one event loop.

Run: ``PYTHONPATH=src python3 benchmarks/async_overhead.py [--calls N]`` (prints medians in
microseconds). An async lookup and save each run in a worker thread (``asyncio.to_thread``), so
the difference between the columns is mostly that thread hop.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import fleche
from fleche.caches import memory_cache


def stores(root: str) -> dict[str, fleche.BaseCache]:
    return {"memory": memory_cache(), "pickle files": fleche.open(f"{root}/files")}


def measure_sync(cache: fleche.BaseCache, calls: int) -> tuple[float, float]:
    @fleche.fleche(cache=cache)
    def work(x):
        return {"x": x}

    misses, hits = [], []
    for samples in (misses, hits):
        for i in range(calls):
            t0 = time.perf_counter()
            work(i)
            samples.append(time.perf_counter() - t0)
    return statistics.median(misses) * 1e6, statistics.median(hits) * 1e6


async def measure_async(cache: fleche.BaseCache, calls: int) -> tuple[float, float]:
    @fleche.fleche(cache=cache)
    async def work(x):
        return {"x": x}

    misses, hits = [], []
    for samples in (misses, hits):
        for i in range(calls):
            t0 = time.perf_counter()
            await work(i)
            samples.append(time.perf_counter() - t0)
    return statistics.median(misses) * 1e6, statistics.median(hits) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    print(f"{'store':14} {'sync miss':>10} {'sync hit':>10} {'async miss':>11} {'async hit':>10}")
    with tempfile.TemporaryDirectory() as root:
        for name, cache in stores(root).items():
            sync_miss, sync_hit = measure_sync(cache, args.calls)
            other = stores(root + "/async")[name]
            async_miss, async_hit = asyncio.run(measure_async(other, args.calls))
            print(f"{name:14} {sync_miss:10.1f} {sync_hit:10.1f} {async_miss:11.1f} {async_hit:10.1f}")


if __name__ == "__main__":
    main()
