"""A cache of pickle-file values and SQL call records, used through the decorator across processes."""

import multiprocessing
import pickle

import pytest

pytest.importorskip("sqlalchemy", reason="the sql extra is not installed")

from fleche import fleche  # noqa: E402
from fleche.call import Call  # noqa: E402
from fleche.caches import Cache, ReadOnlyCache  # noqa: E402
from fleche.storage import Sql, ValuePickleFile  # noqa: E402
from fleche.testing import CacheTests  # noqa: E402


class TestCacheOnSqlite(CacheTests):
    """The cache contract over pickle-file values and SQLite call records (which keep small
    values inline)."""

    def make_store(self, tmp_path):
        values = ValuePickleFile(root=tmp_path / "values", lock_timeout=30)
        return Cache(values, Sql(str(tmp_path / "calls.sqlite")))

    def wrap(self, store):
        return store


class TestReadOnlyCacheOnSqlite(TestCacheOnSqlite):
    writable = False

    def wrap(self, store):
        return ReadOnlyCache(store)

RUNS = []


@fleche
def scaled(values, factor=2):
    RUNS.append(factor)
    return [v * factor for v in values]


def _run_in_child(pickled_cache, values):
    import fleche as f

    with f.cache(pickle.loads(pickled_cache)):
        return scaled(values), scaled.contains(values), len(RUNS)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_round_trip_through_the_decorator_in_another_process(tmp_path, method):
    cache = Cache(ValuePickleFile(root=tmp_path / "values"), Sql(str(tmp_path / "calls.sqlite")))
    import fleche as f

    RUNS.clear()
    with f.cache(cache):
        assert scaled([1, 2]) == [2, 4]
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(1) as pool:
        # The child finds the parent's result without running the body ...
        result, found, child_runs = pool.apply(_run_in_child, (pickle.dumps(cache), [1, 2]))
        assert (result, found) == ([2, 4], True)
        assert child_runs == (1 if method == "fork" else 0)  # fork copies our RUNS list
        # ... and computes a new one that the parent then finds.
        assert pool.apply(_run_in_child, (pickle.dumps(cache), [5]))[0] == [10]
    with f.cache(cache):
        assert scaled.contains([5]) and scaled([5]) == [10]
        (call,) = scaled.query(values=[5])
        assert call.metadata["runtime"]["pid"] != __import__("os").getpid()
    assert RUNS == [2]


# -- compute-once on every SQL store ------------------------------------------------------------

from test_storage_sql import (  # noqa: E402,F401 - db_url is the fixture of every database
    OVERSHOOT_S,
    _close,
    _connection_time,
    _Holder,
    db_url,
)


def test_a_compute_once_waiter_computes_at_the_deadline(tmp_path, db_url):  # noqa: F811
    """A process holds the key of a call (as a compute-once holder would, released by an event);
    the decorated call here gives up waiting at ``lock_timeout``, computes and returns."""
    import time

    from fleche import FlecheWarning

    calls = Sql(db_url, lock_timeout=0.3)
    cache = Cache(ValuePickleFile(root=tmp_path / "values"), calls)

    @fleche(cache=cache, compute_once=True)
    def plus_one(x):
        return x + 1

    assert plus_one(0) == 1  # connected, tables made
    bound = 2 * (calls.lock_timeout + OVERSHOOT_S + _connection_time(calls))
    key = plus_one.digest(1)
    with _Holder(db_url, key):
        t0 = time.monotonic()
        with pytest.warns(FlecheWarning) as warned:
            assert plus_one(1) == 2
        waited = time.monotonic() - t0
        messages = [str(w.message) for w in warned]
        assert any("without waiting" in m for m in messages), messages
        # The first wait is for the lock, the second for the save of the still-held key.
        assert waited < bound, (waited, bound)
    assert plus_one(1) == 2 and plus_one.contains(1)  # computed and stored once the key is free
    _close(calls)


def test_sql_specs_take_a_lock_timeout(tmp_path):
    from fleche.spec import open_store, spec_of

    spec = f"sqlite:///{tmp_path}/calls.db?lock_timeout=0.25"
    cache = open_store(spec)
    assert cache.calls.lock_timeout == 0.25 and cache.values.lock_timeout == 0.25
    assert spec_of(cache) == spec
    assert open_store(f"sqlite:///{tmp_path}/calls.db?lock_timeout=none").calls.lock_timeout is None
    assert open_store(f"sqlite:///{tmp_path}/calls.db").calls.lock_timeout == 1.0
    server = open_store("postgresql://u@db-host/x?values=/shared/v&lock_timeout=5")
    assert server.calls.lock_timeout == 5.0 and server.calls.url == "postgresql+psycopg://u@db-host/x"


def test_an_integer_version_is_cached(tmp_path, db_url, recwarn):  # noqa: F811
    """``@fleche(version=1)`` over ``Sql`` caches like any other version, and keeps the int."""
    calls = Sql(db_url)
    cache = Cache(ValuePickleFile(root=tmp_path / "values"), calls)
    runs = []

    @fleche(cache=cache, version=1)
    def twice(x):
        runs.append(x)
        return 2 * x

    assert twice(3) == 6 and twice(3) == 6 and runs == [3]
    record = calls.load(twice.digest(3))
    assert record.version == 1 and type(record.version) is int
    assert [c.version for c in calls.query(Call(record.name, {"x": 3}, version=1))] == [1]
    assert not [w for w in recwarn if "not cached" in str(w.message)]
    _close(calls)
