"""A cache of pickle-file values and SQL call records, used through the decorator across processes."""

import multiprocessing
import pickle

import pytest

pytest.importorskip("sqlalchemy", reason="the sql extra is not installed")

from fleche import fleche  # noqa: E402
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
