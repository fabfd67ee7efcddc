"""The steps of one ``@fleche`` miss and hit on a store (the default directory store, or a
SQLite database alone with ``--store sqlite``), timed one by one
(no profiler): key (bind and digest the arguments), look-up that misses, the record (digest the
result), the key's lock alone, the record's save (lock, encode, write), and a hit's load.

Each step runs on fresh keys ``--calls`` times; medians in microseconds. The steps do not add up
to a whole miss exactly (the decorator's own glue and the runtime metadata are not timed apart).

Run: python3 benchmarks/miss_steps.py [--calls 2000] [--dir PATH] [--store directory|sqlite]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import fleche


def result_of(x: int) -> dict:
    return {"x": x, "y": [x, 2 * x], "name": "point"}


def median_us(step: Callable[[Any], Any], items: list[Any]) -> float:
    times = []
    for item in items:
        t0 = time.perf_counter()
        step(item)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--dir", help="where to make the store (default: a temporary directory)")
    parser.add_argument("--store", choices=["directory", "sqlite"], default="directory",
                        help="a directory store, or sqlite:///DIR/store.db (values in it too)")
    args = parser.parse_args()
    n = args.calls
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        cache = fleche.open(d if args.store == "directory" else f"sqlite:///{d}/store.db")
        f = fleche.fleche(cache=cache)(result_of)
        cached = f.__fleche__
        f(-1)  # the store's directories and lock file exist from here on
        prepared = [cached._prepare(cache, (x,), {}) for x in range(n)]
        calls = [call.replace(result=result_of(i), metadata={"runtime": {"start": "x"}})
                 for i, (_, call) in enumerate(prepared)]

        def miss(key: Any) -> None:
            try:
                cache.load_result(key)
            except KeyError:
                pass

        def lock(key: Any) -> None:
            with cache.calls._operation_context(key):
                pass

        records = [c.digest() for c in calls]
        steps = {
            "key (bind, digest arguments)": median_us(
                lambda x: cached._prepare(cache, (x,), {}), list(range(n, 2 * n))),
            "look-up that misses": median_us(miss, [k for k, _ in prepared]),
            "record (digest the result)": median_us(lambda c: c.digest(), calls),
            "the key's lock, alone": median_us(lock, [k for k, _ in prepared]),
            "Cache.save (lock, encode, write)": median_us(cache.save, calls),
            "hit: load_result": median_us(cache.load_result, [k for k, _ in prepared]),
            "whole miss, f(x)": median_us(f, list(range(3 * n, 4 * n))),
            "whole hit, f(x)": median_us(f, list(range(3 * n, 4 * n))),
        }
        del records
    for name, us in steps.items():
        print(f"{name:<36} {us:8.1f} us")


if __name__ == "__main__":
    main()
