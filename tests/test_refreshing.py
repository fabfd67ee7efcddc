"""RefreshingCache: the cache contract (every lookup misses), and decorated calls that run
their body every time and replace the stored entry."""

import pytest

from fleche import fleche
from fleche.caches import Cache
from fleche.refreshing import RefreshingCache
from fleche.storage import CallPickleFile, ValuePickleFile
from fleche.testing import CacheTests
from test_caches import OnPickleFiles


class TestRefreshingCache(CacheTests):
    serves_results = False

    def wrap(self, store):
        return RefreshingCache(store)


class TestRefreshingCacheOnPickleFiles(OnPickleFiles, TestRefreshingCache):
    pass


RUNS: list = []


def body(x):
    RUNS.append(x)
    return {"x": x, "run": len(RUNS)}


@pytest.mark.parametrize("compute_once", [False, True])
def test_a_call_through_it_runs_every_time_and_replaces_the_entry(tmp_path, compute_once):
    store = Cache(ValuePickleFile(tmp_path / "values"), CallPickleFile(tmp_path / "calls"))
    RUNS.clear()
    runs = RUNS
    refreshing = fleche(cache=RefreshingCache(store), compute_once=compute_once)(body)
    plain = fleche(cache=store)(body)
    assert plain(1) == {"x": 1, "run": 1}
    assert refreshing(1) == {"x": 1, "run": 2} and refreshing(1) == {"x": 1, "run": 3}
    assert store.load_result(plain.digest(1)) == {"x": 1, "run": 3}  # replaced each time
    assert plain(1) == {"x": 1, "run": 3} and len(runs) == 3  # a hit for the plain cache
    assert refreshing.fleche.query().count() == 1
