"""Functions the Ray tests run in Ray worker processes (importable there)."""

from __future__ import annotations

import ray

# The same cached square as the Dask tests, so Ray and Dask runs share its results; executions
# are counted in a log file.
from dask_tasks import record_run, runs, square  # noqa: F401
from fleche import fleche


@fleche(ignore=("log",))
def inc(x, log):
    record_run(log, f"inc:{x}")
    return x + 1


@fleche(ignore=("log",))
def total(refs, log):
    """Gets its nested refs as refs, as a plain Ray task would."""
    values = ray.get(list(refs))
    record_run(log, "total:" + "+".join(map(str, values)))
    return sum(values)


@fleche(ignore=("log",))
def fails(x, log):
    record_run(log, f"fails:{x}")
    raise ValueError(f"bad input {x}")


@fleche(ignore=("log",))
def kind(x, log):
    record_run(log, f"kind:{type(x).__name__}")
    return type(x).__name__


def plain_add(a, b):
    return a + b


@ray.remote
def call_square(x, log):
    """A plain Ray task calling a @fleche function: it uses the worker's default cache."""
    return square(x, log)


@ray.remote
def save_value(values, value):
    return values.save(value)


@ray.remote
def load_value(values, key):
    return values.load(key)


@ray.remote
def hold_lock(storage, key, held, release):
    """Hold ``key``'s lock until the test puts something into ``release``."""
    with storage.locked(key):
        held.put("held")
        release.get(timeout=60)
    return "released"


def scaled(x, factor):
    return x * factor


@fleche(ignore=("log",), meta={"tag": lambda call: {"answer": 42}}, isolate=True)
def where(x, log):
    """Says where it ran: a fresh working directory with isolate=True."""
    import os

    record_run(log, f"where:{x}")
    return os.getcwd()


@fleche(ignore=("log",), expire=0)
def stale(x, log):
    record_run(log, f"stale:{x}")
    return x


@fleche
async def later(x):
    return x
