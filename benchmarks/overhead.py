"""Per-call cost of caching: hit and miss latency of fleche's stores next to the best peers.

Every system caches the same function (a small dict from an int) in a fresh directory on the same
disk, in one run: first N calls with new arguments (misses), then the same N calls again (hits).
Prints medians and p90 in microseconds and the fleche / peer ratios; ``--json`` writes the
numbers. Peers come with the ``bench`` extra (``pip install -e ".[bench]"``); a missing peer is
skipped with a note.

Run: python3 benchmarks/overhead.py [--calls 2000] [--rounds 3] [--json results.json]

``--s3`` adds object-store rows: it starts a local S3 API server (moto's, ``moto[server]``) on
127.0.0.1 and times a pure S3 store and S3 values with PostgreSQL call records
(``--postgres URL``, a scratch database: fleche's tables are created there), for the small
result and for a 10 MB array. moto on loopback answers in milliseconds; a real S3 adds its own
network latency (tens of milliseconds per request) and bandwidth.

``--database`` adds stores that are a database alone (values in the database too): a SQLite
file, PostgreSQL (``--postgres URL``) and MariaDB (``--mariadb URL``) for the small result and
for a 10 MB array.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleche import fleche
from fleche.caches import Cache, memory_cache

Factory = Callable[[Path], Callable[[int], Any]]


def result_of(x: int) -> dict:
    return {"x": x, "y": [x, 2 * x], "name": "point"}


def uncached(_: Path) -> Callable[[int], Any]:
    return result_of


def fleche_memory(_: Path) -> Callable[[int], Any]:
    return fleche(cache=memory_cache())(result_of)


def fleche_pickle(d: Path) -> Callable[[int], Any]:
    from fleche.storage import CallPickleFile, ValuePickleFile

    return fleche(cache=Cache(ValuePickleFile(d / "values"), CallPickleFile(d / "calls")))(result_of)


def fleche_index(d: Path) -> Callable[[int], Any]:
    """The default directory store (``fleche.open(DIR)``): calls in ``DIR/index.sqlite``."""
    from fleche.storage import CallDirectoryIndex, ValuePickleFile

    return fleche(cache=Cache(ValuePickleFile(d / "values"), CallDirectoryIndex(d)))(result_of)


def fleche_sqlite(d: Path) -> Callable[[int], Any]:
    from fleche.storage import Sql, ValuePickleFile

    return fleche(cache=Cache(ValuePickleFile(d / "values"), Sql(str(d / "calls.sqlite"))))(result_of)


def fleche_h5(d: Path) -> Callable[[int], Any]:
    from fleche.storage import Sql, ValueBagOfHoldingH5File

    cache = Cache(ValueBagOfHoldingH5File(d / "values"), Sql(str(d / "calls.sqlite")))
    return fleche(cache=cache)(result_of)


def _limited(cache: Cache) -> Cache:
    from fleche.limits import SizeLimitedCache

    return SizeLimitedCache(cache, size_limit=10**12)  # never reached: the cost of keeping it


def fleche_memory_limited(_: Path) -> Callable[[int], Any]:
    return fleche(cache=_limited(memory_cache()))(result_of)


def fleche_pickle_limited(d: Path) -> Callable[[int], Any]:
    from fleche.storage import CallPickleFile, ValuePickleFile

    cache = Cache(ValuePickleFile(d / "values"), CallPickleFile(d / "calls"))
    return fleche(cache=_limited(cache))(result_of)


def fleche_sqlite_limited(d: Path) -> Callable[[int], Any]:
    from fleche.storage import Sql, ValuePickleFile

    cache = Cache(ValuePickleFile(d / "values"), Sql(str(d / "calls.sqlite")))
    return fleche(cache=_limited(cache))(result_of)


def diskcache_memoize(d: Path) -> Callable[[int], Any]:
    import diskcache

    return diskcache.Cache(str(d / "diskcache")).memoize()(result_of)


def joblib_memory(d: Path) -> Callable[[int], Any]:
    import joblib

    return joblib.Memory(str(d / "joblib"), verbose=0).cache(result_of)


def cachier_pickle(d: Path) -> Callable[[int], Any]:
    from cachier import cachier

    # separate_files: one file per call, like fleche, instead of one file rewritten per call.
    return cachier(cache_dir=str(d / "cachier"), separate_files=True)(_fresh_function())


BIG_BYTES = 10 * 2**20
_OBJECTS: dict[str, str] = {}
"""Where the object-store systems keep their stores: ``bucket`` and ``postgres`` (``--s3``)."""


def big_result_of(x: int) -> Any:
    """A 10 MB result (a float64 array), different for every argument."""
    import numpy as np

    return np.full(BIG_BYTES // 8, float(x))


def _object_store(result: Callable[[int], Any], calls_in_postgres: bool) -> Factory:
    def factory(d: Path) -> Callable[[int], Any]:
        if not _OBJECTS or (calls_in_postgres and not _OBJECTS.get("postgres")):
            raise ImportError("object-store rows need --s3 (and --postgres URL for PostgreSQL)")
        import fleche as package

        location = f"s3://{_OBJECTS['bucket']}/{d.name}"
        spec = f"{_OBJECTS['postgres']}?values={location}" if calls_in_postgres else location
        # version=: every run has keys of its own in the shared database
        return fleche(cache=package.open(spec), version=d.name)(result)

    return factory


def _database_store(result: Callable[[int], Any], server: str | None) -> Factory:
    """A store that is one database: a SQLite file in the run's directory, or the scratch
    database given for ``server`` (``"postgres"`` or ``"mariadb"``)."""

    def factory(d: Path) -> Callable[[int], Any]:
        import fleche as package

        if server is not None and not _OBJECTS.get(server):
            raise ImportError(f"{server} rows need --database and --{server} URL")
        spec = _OBJECTS[server] if server is not None else f"sqlite:///{d}/store.db"
        # version=: every run has keys of its own in the shared database
        return fleche(cache=package.open(spec), version=d.name)(result)

    return factory


def _fresh_function() -> Callable[[int], Any]:
    def point(x: int) -> dict:
        return {"x": x, "y": [x, 2 * x], "name": "point"}

    return point


SYSTEMS: dict[str, tuple[Factory, float]] = {
    # name: (factory, share of --calls to run: slow stores get fewer calls, same statistics)
    "uncached call": (uncached, 1.0),
    "fleche memory": (fleche_memory, 1.0),
    "fleche directory index": (fleche_index, 1.0),
    "fleche pickle files": (fleche_pickle, 1.0),
    "fleche sqlite + pickle": (fleche_sqlite, 0.25),
    "fleche sqlite + hdf5": (fleche_h5, 0.1),
    "fleche memory, size-limited": (fleche_memory_limited, 1.0),
    "fleche pickle files, size-limited": (fleche_pickle_limited, 1.0),
    "fleche sqlite + pickle, size-limited": (fleche_sqlite_limited, 0.25),
    "diskcache memoize": (diskcache_memoize, 1.0),
    "joblib.Memory": (joblib_memory, 0.25),
    "cachier (files)": (cachier_pickle, 0.25),
}
OBJECT_SYSTEMS: dict[str, tuple[Factory, float]] = {
    "fleche s3 objects": (_object_store(result_of, calls_in_postgres=False), 0.05),
    "fleche s3 + postgresql": (_object_store(result_of, calls_in_postgres=True), 0.1),
    "uncached call, 10 MB": (lambda _: big_result_of, 0.01),
    "fleche s3 + postgresql, 10 MB": (_object_store(big_result_of, calls_in_postgres=True), 0.01),
}
DATABASE_SYSTEMS: dict[str, tuple[Factory, float]] = {
    "fleche sqlite only": (_database_store(result_of, None), 0.25),
    "fleche postgresql only": (_database_store(result_of, "postgres"), 0.1),
    "fleche mariadb only": (_database_store(result_of, "mariadb"), 0.1),
    "uncached call, 10 MB": (lambda _: big_result_of, 0.01),
    "fleche sqlite only, 10 MB": (_database_store(big_result_of, None), 0.01),
    "fleche postgresql only, 10 MB": (_database_store(big_result_of, "postgres"), 0.01),
    "fleche mariadb only, 10 MB": (_database_store(big_result_of, "mariadb"), 0.01),
}
PEERS = ["diskcache memoize", "joblib.Memory", "cachier (files)"]


def timings(f: Callable[[int], Any], n: int, offset: int) -> tuple[list[float], list[float]]:
    """Per-call seconds of n misses then n hits of the same arguments."""
    misses, hits = [], []
    for phase in (misses, hits):
        for i in range(offset, offset + n):
            t0 = time.perf_counter()
            f(i)
            phase.append(time.perf_counter() - t0)
    return misses, hits


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1]


def run(
    calls: int, rounds: int, directory: str | None, systems: dict[str, tuple[Factory, float]]
) -> dict[str, dict[str, float]]:
    samples: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds):
        # Rounds interleave the systems, so a noisy moment hurts all of them alike.
        for name, (factory, share) in systems.items():
            n = max(20, int(calls * share))
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                try:
                    f = factory(Path(tmp))
                except ImportError as e:
                    if r == 0:
                        print(f"  skipping {name}: {e} (pip install -e '.[bench]')", file=sys.stderr)
                    continue
                print(f"  round {r + 1}/{rounds}: {name} ({n} calls)", file=sys.stderr, flush=True)
                misses, hits = timings(f, n, offset=r * 1_000_000)
            entry = samples.setdefault(name, {"miss": [], "hit": []})
            entry["miss"] += misses
            entry["hit"] += hits
    return {
        name: {
            "miss_median_us": statistics.median(s["miss"]) * 1e6,
            "miss_p90_us": p90(s["miss"]) * 1e6,
            "hit_median_us": statistics.median(s["hit"]) * 1e6,
            "hit_p90_us": p90(s["hit"]) * 1e6,
            "calls": len(s["hit"]),
        }
        for name, s in samples.items()
    }


def table(results: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{'system':<30} {'miss med':>9} {'miss p90':>9} {'hit med':>9} {'hit p90':>9}   (us)",
        "-" * 78,
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<30} {r['miss_median_us']:9.1f} {r['miss_p90_us']:9.1f} "
            f"{r['hit_median_us']:9.1f} {r['hit_p90_us']:9.1f}"
        )
    lines.append("")
    lines.append("ratios (median fleche / median peer; below 1.0 fleche is faster)")
    for store in ("fleche directory index", "fleche pickle files", "fleche sqlite + pickle",
                  "fleche sqlite only"):
        for peer in PEERS:
            if store in results and peer in results:
                a, b = results[store], results[peer]
                lines.append(
                    f"  {store:<24} / {peer:<18} hit {a['hit_median_us'] / b['hit_median_us']:5.2f}"
                    f"   miss {a['miss_median_us'] / b['miss_median_us']:5.2f}"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per phase (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--dir", help="directory for the stores (default: the system temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="only the systems whose name contains one of these")
    parser.add_argument("--s3", action="store_true",
                        help="add object-store rows against a local S3 server (moto) it starts")
    parser.add_argument("--database", action="store_true",
                        help="add stores that are a database alone (SQLite; PostgreSQL and "
                        "MariaDB too with --postgres, --mariadb)")
    parser.add_argument("--postgres", default=os.environ.get("FLECHE_TEST_POSTGRES_URL"),
                        help="PostgreSQL URL (a scratch database) for the PostgreSQL rows")
    parser.add_argument("--mariadb", default=os.environ.get("FLECHE_TEST_MARIADB_URL"),
                        help="MariaDB/MySQL URL (a scratch database) for the MariaDB rows")
    args = parser.parse_args()
    systems = dict(SYSTEMS)
    server = None
    if args.s3:
        from fleche.testing_s3 import LocalS3Server

        server = LocalS3Server()
        server.start()
        os.environ.update(server.environment())
        _OBJECTS.update(bucket=server.create_bucket("fleche-bench"), postgres=args.postgres or "")
        systems.update(OBJECT_SYSTEMS)
    if args.database:
        _OBJECTS.setdefault("postgres", args.postgres or "")
        _OBJECTS.setdefault("mariadb", args.mariadb or "")
        systems.update(DATABASE_SYSTEMS)
    if args.only:
        systems = {n: v for n, v in systems.items() if any(o in n for o in args.only)}
    try:
        results = run(args.calls, args.rounds, args.dir, systems)
    finally:
        if server is not None:
            server.stop()
    print(table(results))
    print(f"load average (1, 5, 15 min) after the run: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
