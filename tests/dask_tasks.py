"""Functions and helpers the Dask tests run on worker processes (importable there)."""

from __future__ import annotations

import os
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
