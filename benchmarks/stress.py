"""Multiprocess stress: many processes and threads hammer one store; nothing may be lost.

N processes (``spawn``) x T threads x M operations each, mixed over overlapping keys:
saves, re-saves (same call, new metadata), loads, ``contains``, evictions, and compute-once
calls through ``@fleche``. Afterwards every acknowledged write is verified.

Reported: throughput, p50/p99 latency per operation, exceptions, lost writes (acknowledged but
not readable afterwards), torn or corrupt reads (a load that returned the wrong bytes or raised
``CorruptEntryError``), transient misses (a load that missed a key that was never evicted),
and duplicate computations (compute-once calls computed more than once). Exit status 1 if
anything was lost, torn, corrupt or raised.

Stores (``--store``): ``index`` (the default directory store: calls in ``DIR/index.sqlite``, pickle
values), ``pickle`` (a directory of pickle files), ``h5`` (HDF5 values and calls),
``sqlite`` (SQLite calls, pickle values), or a SQLAlchemy URL such as
``postgresql+psycopg://postgres@127.0.0.1/test`` (calls there, pickle values).

Run: python3 benchmarks/stress.py [--processes 8] [--threads 4] [--ops 500]
         [--store pickle] [--json out.json] [--sweep 1,2,4,8 --plot out.png]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from fleche import fleche
from fleche.caches import Cache
from fleche.call import Call
from fleche.errors import CorruptEntryError

PINNED = 32  # keys saved before the start and never evicted: a miss on them is a transient miss
SHARED = 64  # keys that are saved, re-saved and evicted by everyone
ONCE = 48  # compute-once keys per run
OPERATIONS = ("save", "resave", "load", "contains", "evict", "compute_once")
WEIGHTS = (20, 10, 40, 15, 5, 10)


def open_store(kind: str, directory: Path) -> Cache:
    """The store under test; every process opens its own copy from these settings."""
    from fleche.storage import CallDirectoryIndex, CallPickleFile, ValuePickleFile

    values = ValuePickleFile(directory / "values", lock_timeout=30)
    if kind == "index":
        return Cache(values, CallDirectoryIndex(directory, lock_timeout=30))
    if kind == "pickle":
        return Cache(values, CallPickleFile(directory / "calls", lock_timeout=30))
    if kind == "h5":
        from fleche.storage import CallBagOfHoldingH5File, ValueBagOfHoldingH5File

        return Cache(
            ValueBagOfHoldingH5File(directory / "values", lock_timeout=30),
            CallBagOfHoldingH5File(directory / "calls", lock_timeout=30),
        )
    from fleche.storage import Sql

    if kind == "sqlite":
        return Cache(values, Sql(str(directory / "calls.sqlite")))
    if "://" in kind:
        return Cache(values, Sql(kind))
    raise SystemExit(f"unknown store {kind!r}: use index, pickle, h5, sqlite or a SQLAlchemy URL")


def payload(name: str) -> bytes:
    """The one correct result for a key: any other bytes read back are torn or corrupt."""
    rng = random.Random(name)
    return rng.randbytes(256 + rng.randrange(2048))


def call_of(name: str, **metadata: Any) -> Call:
    return Call("stress", {"name": name}, result=payload(name),
                metadata={"stress": metadata} if metadata else None)


def _compute_once_function(cache: Cache, computed: Counter) -> Any:
    @fleche(cache=cache, compute_once=True, version="stress")
    def once(name: str) -> bytes:
        computed[name] += 1
        return payload(name)

    return once


_shared: dict[str, Any] = {}


def _init_worker(progress: Any, ready: Any) -> None:
    _shared.update(progress=progress, ready=ready)


def worker(spec: tuple, index: int, threads: int, ops: int, seed: int, start: Any) -> dict:
    progress, ready = _shared["progress"], _shared["ready"]
    kind, directory = spec
    cache = open_store(kind, Path(directory))
    report: dict[str, Any] = {
        "latency": defaultdict(list), "exceptions": [], "torn": 0, "transient_misses": 0,
        "acknowledged": [], "computed": Counter(),
    }
    guard = threading.Lock()

    def run_thread(t: int) -> None:
        rng = random.Random(seed * 1000 + t)
        local = defaultdict(list)
        acknowledged, computed = [], Counter()
        torn = misses = 0
        errors: list[str] = []
        once = _compute_once_function(cache, computed)
        for i in range(ops):
            op = rng.choices(OPERATIONS, WEIGHTS)[0]
            pinned = rng.random() < 0.4
            name = f"pinned-{rng.randrange(PINNED)}" if pinned else f"shared-{rng.randrange(SHARED)}"
            key = call_of(name).to_lookup_key()
            t0 = time.perf_counter()
            try:
                if op == "save":
                    own = f"own-{index}-{t}-{i}"  # unique: never evicted, must survive
                    cache.save(call_of(own, writer=os.getpid()))
                    acknowledged.append(own)
                elif op == "resave":
                    cache.save(call_of(name, writer=os.getpid(), seq=i))
                elif op == "load":
                    try:
                        if cache.load_result(key) != payload(name):
                            torn += 1
                    except KeyError:
                        misses += name.startswith("pinned")
                elif op == "contains":
                    if not cache.contains(key) and name.startswith("pinned"):
                        misses += 1
                elif op == "evict" and not name.startswith("pinned"):
                    try:
                        cache.evict(key)
                    except KeyError:
                        pass
                elif op == "compute_once":
                    once_name = f"once-{rng.randrange(ONCE)}"
                    if once(once_name) != payload(once_name):
                        torn += 1
            except CorruptEntryError:
                torn += 1
            except Exception as e:  # noqa: BLE001 - every exception is a finding
                errors.append(f"{op}: {type(e).__name__}: {e}")
            local[op].append(time.perf_counter() - t0)
            if i % 25 == 24:
                with progress.get_lock():
                    progress.value += 25
        with guard:
            for op, samples in local.items():
                report["latency"][op] += samples
            report["acknowledged"] += acknowledged
            report["computed"].update(computed)
            report["torn"] += torn
            report["transient_misses"] += misses
            report["exceptions"] += errors

    with ready.get_lock():
        ready.value += 1
    start.wait()
    pool = [threading.Thread(target=run_thread, args=(t,)) for t in range(threads)]
    began = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    report["seconds"] = time.perf_counter() - began
    report["latency"] = dict(report["latency"])
    report["computed"] = dict(report["computed"])
    return report


def _bar(done: int, total: int, began: float) -> None:
    if not sys.stderr.isatty() and not os.environ.get("FLECHE_PROGRESS"):
        return
    width = 30
    filled = int(width * done / max(total, 1))
    rate = done / max(time.perf_counter() - began, 1e-9)
    sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} ops "
                     f"{rate:,.0f}/s")
    sys.stderr.flush()


def run(kind: str, processes: int, threads: int, ops: int, directory: Path) -> dict:
    cache = open_store(kind, directory)
    for i in range(PINNED):
        cache.save(call_of(f"pinned-{i}"))
    ctx = multiprocessing.get_context("spawn")
    progress, ready = ctx.Value("l", 0), ctx.Value("l", 0)
    start = ctx.Manager().Event()
    total = processes * threads * ops
    with ctx.Pool(processes, initializer=_init_worker, initargs=(progress, ready)) as pool:
        pending = [
            pool.apply_async(worker, ((kind, str(directory)), p, threads, ops, p + 1, start))
            for p in range(processes)
        ]
        while ready.value < processes:  # the clock starts once every process has its store open
            if any(p.ready() for p in pending):
                break  # a worker failed early; its error surfaces below
            time.sleep(0.05)
        began = time.perf_counter()
        start.set()
        while not all(p.ready() for p in pending):
            _bar(progress.value, total, began)
            time.sleep(0.2)
        reports = [p.get() for p in pending]
        wall = time.perf_counter() - began
    _bar(total, total, began)
    if sys.stderr.isatty() or os.environ.get("FLECHE_PROGRESS"):
        sys.stderr.write("\n")
    return summarize(cache, reports, wall, processes, threads, ops, kind)


def summarize(cache: Cache, reports: list[dict], wall: float, processes: int, threads: int,
              ops: int, kind: str) -> dict:
    latency: dict[str, list[float]] = defaultdict(list)
    computed: Counter = Counter()
    for r in reports:
        for op, samples in r["latency"].items():
            latency[op] += samples
        computed.update(r["computed"])
    acknowledged = [name for r in reports for name in r["acknowledged"]]
    lost = []
    for name in acknowledged + [f"pinned-{i}" for i in range(PINNED)]:
        try:
            if cache.load_result(call_of(name).to_lookup_key()) != payload(name):
                lost.append(name)
        except (KeyError, CorruptEntryError):
            lost.append(name)
    exceptions = [e for r in reports for e in r["exceptions"]]
    return {
        "store": kind,
        "processes": processes,
        "threads": threads,
        "operations": processes * threads * ops,
        "seconds": wall,
        "throughput_ops_per_s": processes * threads * ops / wall,
        "latency_us": {
            op: {"p50": statistics.median(s) * 1e6,
                 "p99": statistics.quantiles(s, n=100)[-1] * 1e6 if len(s) > 1 else s[0] * 1e6,
                 "count": len(s)}
            for op, s in sorted(latency.items())
        },
        "exceptions": len(exceptions),
        "exception_samples": exceptions[:5],
        "acknowledged_writes": len(acknowledged),
        "lost_writes": len(lost),
        "torn_or_corrupt_reads": sum(r["torn"] for r in reports),
        "transient_misses": sum(r["transient_misses"] for r in reports),
        "compute_once_keys": len(computed),
        "duplicate_computations": sum(computed.values()) - len(computed),
    }


def failed(result: dict) -> bool:
    return bool(result["exceptions"] or result["lost_writes"] or result["torn_or_corrupt_reads"]
                or result["transient_misses"])


def show(result: dict) -> None:
    print(f"{result['store']}: {result['processes']} processes x {result['threads']} threads, "
          f"{result['operations']} operations in {result['seconds']:.2f} s = "
          f"{result['throughput_ops_per_s']:,.0f} ops/s")
    for op, lat in result["latency_us"].items():
        print(f"  {op:<13} p50 {lat['p50']:9.1f} us   p99 {lat['p99']:9.1f} us   ({lat['count']})")
    print(f"  exceptions {result['exceptions']}, lost writes {result['lost_writes']} of "
          f"{result['acknowledged_writes']}, torn/corrupt reads {result['torn_or_corrupt_reads']}, "
          f"transient misses {result['transient_misses']}, duplicate computations "
          f"{result['duplicate_computations']} over {result['compute_once_keys']} keys")
    for sample in result["exception_samples"]:
        print(f"    {sample}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["processes"] for r in results], [r["throughput_ops_per_s"] for r in results], "o-")
    ax.set_xlabel("processes")
    ax.set_ylabel("operations per second (all processes)")
    ax.set_title(f"fleche stress: {results[0]['store']} store, {results[0]['threads']} threads each")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--ops", type=int, default=500, help="operations per thread")
    parser.add_argument("--store", default="pickle")
    parser.add_argument("--dir", help="where to create the store (default: a temporary dir)")
    parser.add_argument("--sweep", help="comma-separated process counts, e.g. 1,2,4,8")
    parser.add_argument("--plot", type=Path, help="PNG of throughput against processes")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    counts = [int(n) for n in args.sweep.split(",")] if args.sweep else [args.processes]
    results = []
    for n in counts:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            result = run(args.store, n, args.threads, args.ops, Path(tmp))
        show(result)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 1 if any(failed(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
