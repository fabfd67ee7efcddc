"""StatsCache counts hits, misses and saves of any cache."""

import pickle
import threading

import pytest

from fleche import fleche, memory_cache
from fleche.caches import Cache
from fleche.stats import BYTES_WRITTEN, Counters, StatsCache
from fleche.storage import CallPickleFile, ValuePickleFile
from fleche.testing import CacheTests


class TestStatsCache(CacheTests):
    def wrap(self, store):
        return StatsCache(store)


class TestStatsCacheOnPickleFiles(TestStatsCache):
    def make_store(self, tmp_path):
        return Cache(ValuePickleFile(root=tmp_path / "values"), CallPickleFile(root=tmp_path / "calls"))


def test_counts_hits_misses_and_saves():
    stats = StatsCache(memory_cache())

    @fleche(cache=stats)
    def double(x):
        return 2 * x

    for x in [1, 2, 1, 1, 3]:
        double(x)
    counts = stats.stats()
    assert (counts["hits"], counts["misses"], counts["saves"]) == (2, 3, 3)
    assert counts["load_seconds"] > 0 and counts["save_seconds"] > 0
    assert stats.writable
    with pytest.raises(AttributeError):
        stats.values  # the wrapper forwards the declared cache operations, nothing else


def test_failed_saves_count_as_errors():
    stats = StatsCache(memory_cache())
    with pytest.raises(AttributeError):
        stats.save("not a call")
    assert stats.stats()["errors"] == 1


def test_bytes_written_is_the_growth_of_the_process_counter():
    stats = StatsCache(memory_cache())
    BYTES_WRITTEN.add("bytes", 100)
    assert stats.stats()["bytes_written"] == 100


def test_counters_are_thread_safe_and_pickle_as_zero():
    counters = Counters()

    def bump():
        for _ in range(10000):
            counters.add("n")

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counters.get("n") == 40000
    assert pickle.loads(pickle.dumps(counters)).snapshot() == {}
    copy = pickle.loads(pickle.dumps(StatsCache(memory_cache())))
    assert copy.stats()["hits"] == 0
