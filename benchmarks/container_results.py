"""Results that are containers of many small parts: a list of numbers, a dict of short lists.

Each system caches a function returning such a result, in a fresh directory: N calls with new
arguments (misses), then the same N calls again (hits). fleche's default directory store keeps
parts smaller than ``inline_parts`` bytes (2048) in their container's file; ``inline_parts=0``
stores every element apart (what ``ValuePickleFile`` built by hand does); diskcache's
``memoize`` pickles the result whole. Prints median microseconds per call and the files made per call (besides SQLite indexes).

Run: python3 benchmarks/container_results.py [--calls 20] [--json out.json]
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

SHAPES: dict[str, Callable[[int], Any]] = {
    "list of 1000 floats": lambda x: [x + i / 7 for i in range(1000)],
    "list of 10000 floats": lambda x: [x + i / 7 for i in range(10_000)],
    "dict of 100 short lists": lambda x: {f"run-{i}": [x, i, x * i / 3] for i in range(100)},
}


def systems(shape: Callable[[int], Any]) -> dict[str, Callable[[Path], Callable[[int], Any]]]:
    def fleche_store(options: str) -> Callable[[Path], Callable[[int], Any]]:
        def make(d: Path) -> Callable[[int], Any]:
            import fleche

            return fleche.fleche(cache=fleche.open(f"{d}{options}"))(shape)

        return make

    def diskcache_memoize(d: Path) -> Callable[[int], Any]:
        import diskcache

        return diskcache.Cache(str(d)).memoize()(shape)

    return {
        "fleche (default)": fleche_store(""),
        "fleche inline_parts=0": fleche_store("?inline_parts=0"),
        "diskcache": diskcache_memoize,
    }


_INDEX_FILES = (".db", ".sqlite", "-wal", "-shm", ".lock")


def files_besides_the_index(d: Path) -> int:
    """Files in the store other than its SQLite index and lock files: one per stored part."""
    return sum(
        not name.endswith(_INDEX_FILES) for _, _, files in os.walk(d) for name in files
    )


def measure(make: Callable[[Path], Callable[[int], Any]], calls: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        f = make(d)
        times: dict[str, list[float]] = {"miss": [], "hit": []}
        for phase in ("miss", "hit"):
            for x in range(calls):
                began = time.perf_counter()
                f(x)
                times[phase].append(time.perf_counter() - began)
        return {
            "miss_us": statistics.median(times["miss"]) * 1e6,
            "hit_us": statistics.median(times["hit"]) * 1e6,
            "files_per_call": files_besides_the_index(d) / calls,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, dict[str, dict]] = {}
    print(f"{'result':<24} {'system':<22} {'miss µs':>10} {'hit µs':>9} {'files/call':>10}")
    for shape_name, shape in SHAPES.items():
        for name, make in systems(shape).items():
            print(f"  {shape_name}: {name}", file=sys.stderr, flush=True)
            try:
                r = measure(make, args.calls)
            except ImportError as e:
                print(f"  skipping {name}: {e}", file=sys.stderr)
                continue
            results.setdefault(shape_name, {})[name] = r
            print(f"{shape_name:<24} {name:<22} {r['miss_us']:10,.0f} {r['hit_us']:9,.0f} "
                  f"{r['files_per_call']:10.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
