"""Functions and helpers the Dask tests run on worker processes (importable there)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from fleche import fleche
from fleche.caches import CacheWrapper


def record_run(log: str, text: str) -> None:
    """Append one line to ``log``: executions are counted outside any process's memory."""
    with open(log, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


def runs(log: str) -> list[str]:
    try:
        with open(log) as f:
            return [line.split()[0] for line in f]
    except FileNotFoundError:
        return []


@fleche(ignore=("log",))
def square(x, log):
    record_run(log, f"square:{x}")
    return {"x": x, "square": x * x}


@fleche(ignore=("log",))
def total_of_squares(n, log):
    record_run(log, f"total:{n}")
    return sum(square(i, log)["square"] for i in range(n))


@fleche(ignore=("log",))
def fails(x, log):
    record_run(log, f"fails:{x}")
    raise ValueError(f"bad input {x}")


@fleche
def big_array(n):
    return np.full(n, 7.0)


def plain_inc(x, log):
    record_run(log, f"inc:{x}")
    return x + 1


def plain_add(a, b, log):
    record_run(log, f"add:{a}+{b}")
    return a + b


def save_value(values, value):
    return values.save(value)


def load_value(values, key):
    return values.load(key)


@dataclass(frozen=True)
class GatedCache(CacheWrapper):
    """Signals ``saving`` then waits for ``release`` (distributed Events) before each save."""

    saving: str = "saving"
    release: str = "release"

    def save(self, call, *, overwrite=False):
        from distributed import Event

        Event(self.saving).set()
        if not Event(self.release).wait(60):
            raise TimeoutError("the test never released the save")
        return self.cache.save(call, overwrite=overwrite)


# -- whole-graph caching: pipelines of every collection type -----------------------------------
# Each stage records its runs in ``log``; ``build(kind, log, **changes)`` builds the same
# pipeline in any process, with new names where dask makes them random.


def scale(x, factor, log):
    """A logged stage for array blocks and bag items alike."""
    record_run(log, f"scale:{factor}")
    return x * factor


def add_offset(x, amount, log):
    record_run(log, f"offset:{amount}")
    return x + amount


def fail_block(block, bad, log):
    if (block == bad).any():
        record_run(log, "fail:raised")
        raise ValueError(f"bad value {bad} in a block")
    record_run(log, "fail:passed")
    return block


def busy_inc(x, seconds, log):
    """``x + 1`` after at least ``seconds`` of work: a task worth storing."""
    record_run(log, f"busy:{x}")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return x + 1


class CountedPayload:
    """An input whose digests are counted (in this process): fleche digests it on the client."""

    digests = 0

    def __init__(self, value):
        self.value = value

    def __digest__(self):
        CountedPayload.digests += 1
        return self.value


def payload_size(payload, i):
    return len(payload.value) + i


def scale_partition(frame, factor, log):
    record_run(log, f"scale:{factor}")
    return frame.assign(x=frame.x * factor)


def offset_partition(frame, offset, log):
    record_run(log, f"offset:{offset}")
    return frame.assign(y=frame.x + offset)


def input_array():
    return np.arange(64, dtype=np.int64).reshape(8, 8)


def input_frame():
    import pandas as pd

    return pd.DataFrame(
        {"x": np.arange(24, dtype=np.int64), "key": [i % 3 for i in range(24)],
         "name": [f"n{i}" for i in range(24)]},
        index=pd.RangeIndex(24, name="i"),
    )


def build(kind, log, factor=2, offset=1):
    """Two logged stages (scale, then offset) and a reduction, as one collection of ``kind``."""
    if kind == "array":
        import dask.array as da

        x = da.from_array(input_array(), chunks=4)  # embedded input, 4 chunks
        meta = np.empty((0, 0), dtype=np.int64)
        a = x.map_blocks(scale, factor, log, meta=meta)
        b = a.map_blocks(add_offset, offset, log, meta=meta)
        return (b @ b.T).sum(axis=0)  # integer matmul: exact on every scheduler
    if kind == "frame":
        import dask.dataframe as dd

        frame = dd.from_pandas(input_frame(), npartitions=3)
        meta = input_frame().head(0)
        a = frame.map_partitions(scale_partition, factor, log, meta=meta)
        b = a.map_partitions(offset_partition, offset, log, meta=meta.assign(y=meta.x))
        return b.groupby("key").y.sum()
    if kind == "bag":
        import dask.bag as db

        items = db.from_sequence(range(12), npartitions=3)
        return items.map(scale, factor, log).map(add_offset, offset, log).sum()
    if kind == "delayed":
        from dask import delayed

        parts = [delayed(add_offset)(delayed(scale)(i, factor, log), offset, log)
                 for i in range(4)]
        return delayed(sum)(parts)
    raise ValueError(kind)


def compute_in_fresh_process(kinds, log, store_root, scheduler, out):
    """What a test's fresh Python process runs: build each pipeline of ``kinds`` (comma
    separated), compute it through the store, pickle the results by kind into ``out``."""
    import pickle

    import dask

    from fleche.dask import cached

    def compute_all():
        return {kind: cached(build(kind, log), store=store_root).compute()
                for kind in kinds.split(",")}

    if scheduler == "threads":
        with dask.config.set(scheduler="threads"):
            results = compute_all()
    else:
        from distributed import Client

        with Client(scheduler):
            results = compute_all()
    with open(out, "wb") as f:
        pickle.dump(results, f)


def locked_identity(x, lock, log):
    """A task with an argument fleche cannot key (a lock)."""
    record_run(log, "identity")
    with lock:
        return x
