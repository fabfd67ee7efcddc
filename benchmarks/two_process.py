"""Two processes sharing one cache directory: throughput, recomputation, and nothing lost.

Each process makes 2000 memoized calls over the same 1000 keys in the same order (every key
twice), started together. Reported per system: total calls per second, how many keys were
computed more than once, exceptions, and after the run, entries lost or read back wrong.

Systems: fleche with the default directory store (calls in ``DIR/index.sqlite``, plain and
with ``compute_once=True``), with the file layout (``fleche files``), diskcache's
``memoize`` and ``joblib.Memory`` (from the ``bench`` extra).

Run: python3 benchmarks/two_process.py [--keys 1000] [--rounds 3] [--dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any


def value_of(x: int) -> dict:
    return {"x": x, "square": x * x, "tag": f"key-{x}"}


def make(system: str, directory: str, computed: Counter) -> Any:
    def body(x: int) -> dict:
        computed[x] += 1
        return value_of(x)

    if system.startswith("fleche"):
        from fleche import fleche
        from fleche.caches import Cache
        from fleche.storage import CallDirectoryIndex, CallPickleFile, ValuePickleFile

        calls = (
            CallPickleFile(f"{directory}/calls", lock_timeout=30)
            if system.startswith("fleche files")
            else CallDirectoryIndex(directory, lock_timeout=30)
        )
        cache = Cache(ValuePickleFile(f"{directory}/values", lock_timeout=30), calls)
        return fleche(cache=cache, compute_once=system.endswith("compute-once"))(body)
    if system == "diskcache":
        import diskcache

        return diskcache.Cache(f"{directory}/diskcache").memoize()(body)
    if system == "joblib":
        import joblib

        return joblib.Memory(f"{directory}/joblib", verbose=0).cache(body)
    raise ValueError(system)


def worker(system: str, directory: str, keys: int, barrier: Any) -> dict:
    computed: Counter = Counter()
    f = make(system, directory, computed)
    errors = wrong = 0
    barrier.wait()
    began = time.perf_counter()
    for x in list(range(keys)) * 2:
        try:
            if f(x) != value_of(x):
                wrong += 1
        except Exception:  # noqa: BLE001 - counted
            errors += 1
    return {"seconds": time.perf_counter() - began, "computed": dict(computed),
            "errors": errors, "wrong": wrong}


def verify(system: str, directory: str, keys: int) -> tuple[int, int]:
    """Entries lost (recomputed on a third pass) and read back wrong."""
    computed: Counter = Counter()
    f = make(system, directory, computed)
    wrong = sum(f(x) != value_of(x) for x in range(keys))
    return sum(computed.values()), wrong


def run_once(system: str, keys: int, directory: str | None) -> dict:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Manager().Barrier(2)
        with ctx.Pool(2) as pool:
            reports = pool.starmap(worker, [(system, tmp, keys, barrier)] * 2)
            # In a third process of the same kind: caches key by module, and ours is __mp_main__.
            lost, wrong_after = pool.apply(verify, (system, tmp, keys))
    computed: Counter = Counter()
    for r in reports:
        computed.update(r["computed"])
    wall = max(r["seconds"] for r in reports)
    return {
        "calls_per_s": 2 * 2 * keys / wall,
        "keys_computed_twice": sum(1 for n in computed.values() if n > 1),
        "computations": sum(computed.values()),
        "exceptions": sum(r["errors"] for r in reports),
        "wrong_reads": sum(r["wrong"] for r in reports) + wrong_after,
        "lost_entries": lost,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="directory for the caches (default: system temp dir)")
    parser.add_argument(
        "--systems",
        default="fleche,fleche compute-once,fleche files,fleche files compute-once,diskcache,joblib",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for system in args.systems.split(","):
            print(f"  round {r + 1}/{args.rounds}: {system}", file=sys.stderr, flush=True)
            try:
                results.setdefault(system, []).append(run_once(system, args.keys, args.dir))
            except ImportError as e:
                print(f"  skipping {system}: {e}", file=sys.stderr)
    summary = {}
    print(f"{'system':<24} {'calls/s':>9} {'keys twice':>11} {'exceptions':>11} "
          f"{'wrong':>6} {'lost':>5}")
    for system, runs in results.items():
        s = {
            "calls_per_s": statistics.median(r["calls_per_s"] for r in runs),
            "keys_computed_twice": statistics.median(r["keys_computed_twice"] for r in runs),
            "exceptions": sum(r["exceptions"] for r in runs),
            "wrong_reads": sum(r["wrong_reads"] for r in runs),
            "lost_entries": sum(r["lost_entries"] for r in runs),
            "rounds": len(runs),
        }
        summary[system] = s
        print(f"{system:<24} {s['calls_per_s']:9,.0f} {s['keys_computed_twice']:11.0f} "
              f"{s['exceptions']:11d} {s['wrong_reads']:6d} {s['lost_entries']:5d}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
