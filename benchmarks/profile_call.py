"""Where one miss and one hit of a ``@fleche`` call spend their time, on the default directory
store: cProfile over N misses, then the same N calls again (hits), per-call microseconds of the
functions that take the most (cumulative), so a change to the decorator or cache path shows up.

Run: python3 benchmarks/profile_call.py [--calls 2000] [--top 25] [--dir PATH]
cProfile slows every Python call down, so its times are larger than ``overhead.py``'s; compare
them with each other, not with wall-clock latencies.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import fleche


def result_of(x: int) -> dict:
    return {"x": x, "y": [x, 2 * x], "name": "point"}


def profile(fn, calls: list[int], top: int, label: str) -> None:
    profiler = cProfile.Profile()
    began = time.perf_counter()
    profiler.enable()
    for x in calls:
        fn(x)
    profiler.disable()
    wall = (time.perf_counter() - began) / len(calls) * 1e6
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}({name})" if line else name
        rows.append((cumtime, tottime, ncalls, where))
    rows.sort(reverse=True)
    print(f"\n{label}: {wall:.1f} us per call under the profiler ({len(calls)} calls)")
    print(f"{'cum us':>8} {'own us':>8} {'per call':>8}  function")
    for cumtime, tottime, ncalls, where in rows[:top]:
        n = len(calls)
        print(f"{cumtime / n * 1e6:8.1f} {tottime / n * 1e6:8.1f} {ncalls / n:8.2f}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--dir", help="where to make the store (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        f = fleche.fleche(cache=fleche.open(d))(result_of)
        f(-1)  # the first call makes the store's directories and lock file
        calls = list(range(args.calls))
        profile(f, calls, args.top, "miss")
        profile(f, calls, args.top, "hit")


if __name__ == "__main__":
    main()
