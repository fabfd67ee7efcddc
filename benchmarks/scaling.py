"""How fleche's per-call costs grow with the store: hit, miss, ``contains``, ``expand`` of a
short prefix and ``fleche ls --limit 20`` at 10^3, 10^4, 10^5 stored calls, plus the wall time
of ``fleche info``, ``verify`` and ``gc`` at the largest size, for each store spec given.

A spec is any store spec with ``DIR`` standing for a fresh directory: the default compares a
directory store (``DIR``) with a SQLite store (``sqlite:///DIR/calls.db?values=DIR/values``);
``DIR?layout=index`` works once that layout exists. Each store is filled once, growing from one
size to the next through the decorator (each fill call is a miss, timed as such), with progress
on standard error. Per-call numbers are medians over ``--probes`` calls (a hit and a contains
of stored keys, a miss of new arguments, an expand of 8-character prefixes); ``ls`` is the
median of three runs of the command in this process.

Run: python3 benchmarks/scaling.py [--sizes 1000 10000 100000] [--spec DIR ...]
     [--probes 300] [--dir PATH] [--json benchmarks/results/scaling.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import fleche
from fleche.cli import main as cli

DEFAULT_SPECS = ["DIR", "sqlite:///DIR/calls.db?values=DIR/values"]


def result_of(x: int) -> dict:
    return {"x": x, "y": [x, 2 * x], "name": "point"}


def per_call_us(fn: Callable[[Any], Any], items: list[Any]) -> float:
    """The median microseconds of ``fn(item)`` over ``items``."""
    times = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def wall_s(*argv: str) -> float:
    """Seconds that ``fleche ARGV`` takes in this process (its output thrown away)."""
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = cli(list(argv))
    took = time.perf_counter() - t0
    if status not in (0, 1):
        raise RuntimeError(f"fleche {' '.join(argv)} exited {status}")
    return took


def fill(f: Callable[[int], Any], start: int, stop: int, label: str) -> float:
    """Call ``f`` on ``start..stop-1`` (all misses), showing progress; microseconds per call."""
    t0 = time.perf_counter()
    step = max(1, (stop - start) // 20)
    for i in range(start, stop):
        f(i)
        if (i - start) % step == 0 or i == stop - 1:
            done = i - start + 1
            rate = done / max(time.perf_counter() - t0, 1e-9)
            print(f"\r  fill {label}: {i + 1}/{stop} ({rate:.0f} calls/s)", end="", file=sys.stderr)
    print(file=sys.stderr)
    return (time.perf_counter() - t0) / max(stop - start, 1) * 1e6


def measure(spec_template: str, sizes: list[int], probes: int, where: str | None) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(dir=where) as d:
        spec = spec_template.replace("DIR", d)
        cache = fleche.open(spec)
        f = fleche.fleche(cache=cache)(result_of)
        rng = random.Random(0)
        stored = 0
        fresh = -1  # misses use negative arguments, never filled
        for size in sizes:
            fill_us = fill(f, stored, size, f"{spec_template} to {size}")
            stored = size
            sample = rng.sample(range(stored), min(probes, stored))
            keys = [f.digest(x) for x in sample]
            new = list(range(fresh, fresh - probes, -1))
            fresh -= probes
            row = {
                "size": size,
                "fill_us": round(fill_us, 1),
                "hit_us": round(per_call_us(f, sample), 1),
                "miss_us": round(per_call_us(f, new), 1),
                "contains_us": round(per_call_us(cache.contains, keys), 1),
                "expand_us": round(per_call_us(cache.expand, [k[:8] for k in keys[:50]]), 1),
                "ls_limit_20_s": round(statistics.median(
                    wall_s("ls", spec, "--limit", "20") for _ in range(3)), 4),
            }
            stored += probes  # the misses were saved too
            rows.append(row)
            print(f"  {spec_template} at {size}: {row}", file=sys.stderr)
        largest = {
            "size": stored,
            "info_s": round(wall_s("info", spec), 3),
            "verify_s": round(wall_s("verify", spec), 3),
            "gc_s": round(wall_s("gc", spec), 3),
        }
        print(f"  {spec_template} at {stored}: {largest}", file=sys.stderr)
    return {"spec": spec_template, "sizes": rows, "largest": largest}


def table(results: list[dict]) -> str:
    head = ("spec", "calls", "fill", "hit", "miss", "contains", "expand", "ls -n20")
    lines = [head]
    for r in results:
        for row in r["sizes"]:
            lines.append((
                r["spec"], str(row["size"]), f"{row['fill_us']:.0f}", f"{row['hit_us']:.0f}",
                f"{row['miss_us']:.0f}", f"{row['contains_us']:.0f}", f"{row['expand_us']:.0f}",
                f"{row['ls_limit_20_s'] * 1e3:.0f} ms",
            ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["per call, microseconds (median); ls: milliseconds per command"]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
            for line in lines]
    out.append("")
    out.append("at the largest size, seconds per command:")
    for r in results:
        big = r["largest"]
        out.append(f"  {r['spec']}: {big['size']} calls: info {big['info_s']:.2f} s, verify "
                   f"{big['verify_s']:.2f} s, gc {big['gc_s']:.2f} s")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--spec", action="append", help="a store spec with DIR in it (repeatable)")
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--dir", help="where to make the stores (default: the temporary directory)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    results = [measure(s, sizes, args.probes, args.dir) for s in args.spec or DEFAULT_SPECS]
    print(table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump({"python": platform.python_version(), "machine": platform.machine(),
                       "results": results}, out, indent=2)
            out.write("\n")


if __name__ == "__main__":
    main()
