"""Latency of the ``Sql`` call storage on the cache's hot path, next to diskcache.

Measures, in one process and one directory: ``Sql.save``, ``Sql.load`` (of a stored and of a
missing key) and ``Sql.contains`` of a small record, ``Cache.load_result`` of a small stored
result, and misses and hits of one function cached by ``@fleche`` with
``Cache(ValuePickleFile, Sql)`` and by ``diskcache.Cache.memoize``. Prints medians and p90 in
microseconds. SQLite always; a server database when its URL is given (``--url``, repeatable; the
fleche tables in it are dropped first and afterwards).

Run: python3 benchmarks/sql_hot_path.py [--n 2000] [--url postgresql+psycopg://...] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleche import fleche
from fleche.call import Call
from fleche.caches import Cache
from fleche.storage import Sql, ValuePickleFile


def result_of(x: int) -> dict:
    return {"x": x, "y": [x, 2 * x], "name": "point"}


def _record(i: int) -> Any:
    return Call(
        "result_of", {"x": i}, metadata={"run": {"host": "h", "i": i}}, module="bench", result=i
    ).digest()


def _samples(f: Callable[[int], Any], n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        f(i)
        out.append(time.perf_counter() - t0)
    return out


def _stats(samples: list[float]) -> str:
    med = statistics.median(samples) * 1e6
    p90 = statistics.quantiles(samples, n=10)[-1] * 1e6
    return f"{med:9.1f} {p90:9.1f}"


def _drop(url: str) -> None:
    import sqlalchemy as sa

    from fleche.storage.sql.schema import schema

    engine = sa.create_engine(Sql(url)._sqlalchemy_url())
    schema.drop_all(engine)
    engine.dispose()


def storage_ops(url: str, n: int) -> dict[str, list[float]]:
    storage = Sql(url)
    records = [_record(i) for i in range(n)]
    keys = [r.to_lookup_key() for r in records]
    absent = [_record(-2 - i).to_lookup_key() for i in range(n)]
    storage.save(_record(-1))  # connect and create the tables outside the timings
    result = {
        "Sql.save (new)": _samples(lambda i: storage.save(records[i]), n),
        "Sql.save (replace)": _samples(lambda i: storage.save(records[i]), n),
        "Sql.load": _samples(lambda i: storage.load(keys[i]), n),
        "Sql.load (missing)": _samples(lambda i: _missing(storage, absent[i]), n),
        "Sql.contains": _samples(lambda i: storage.contains(keys[i]), n),
    }
    storage.close()
    return result


def _missing(storage: Sql, key: str) -> None:
    try:
        storage.load(key)
    except KeyError:
        return
    raise AssertionError(f"{key} is stored")


def cache_ops(directory: Path, url: str, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    calls = Sql(url)
    f = fleche(cache=Cache(ValuePickleFile(directory / "values"), calls))(result_of)
    f(-1)
    out["@fleche Sql+pickle miss"] = _samples(f, n)
    out["@fleche Sql+pickle hit"] = _samples(f, n)
    cache = Cache(ValuePickleFile(directory / "values"), calls)
    stored = [cache.save(Call("result_of", {"x": i}, module="bench", result=i)) for i in range(n)]
    out["Cache.load_result hit"] = _samples(lambda i: cache.load_result(stored[i]), n)
    calls.close()
    try:
        import diskcache
    except ImportError:
        print("  diskcache not installed: skipped", file=sys.stderr)
        return out
    dc = diskcache.Cache(str(directory / "diskcache"))
    g = dc.memoize()(result_of)
    g(-1)
    out["diskcache memoize miss"] = _samples(g, n)
    out["diskcache memoize hit"] = _samples(g, n)
    dc.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="operations per measurement")
    parser.add_argument("--url", action="append", default=[], help="a server database URL")
    parser.add_argument("--dir", help="directory for the stores (default: the system temp dir)")
    parser.add_argument("--profile", action="store_true", help="cProfile the SQLite hit path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        sqlite_url = str(d / "calls.sqlite")
        if args.profile:
            storage = Sql(sqlite_url)
            key = storage.save(_record(0))
            profile = cProfile.Profile()
            profile.runcall(lambda: [storage.load(key) for _ in range(args.n)])
            pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
            return
        print(f"{'sqlite':<28} {'median':>9} {'p90':>9}   (us)")
        for name, s in {**storage_ops(sqlite_url, args.n), **cache_ops(d, str(d / "c.sqlite"), args.n)}.items():
            print(f"  {name:<26} {_stats(s)}")
        for url in args.url:
            _drop(url)
            try:
                print(f"{url.split(':')[0]:<28} {'median':>9} {'p90':>9}   (us)")
                for name, s in storage_ops(url, args.n).items():
                    print(f"  {name:<26} {_stats(s)}")
                for name, s in cache_ops(d / "server", url, args.n).items():
                    if not name.startswith("diskcache"):
                        print(f"  {name:<26} {_stats(s)}")
            finally:
                _drop(url)


if __name__ == "__main__":
    main()
