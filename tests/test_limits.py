"""SizeLimitedCache: the cache contract, least-recently-used eviction on every store, values
shared by calls, the victim choice, and processes sharing one store."""

import multiprocessing
import subprocess
import sys
import time
import warnings

import pytest

from fleche import fleche
from fleche.caches import Cache
from fleche.call import Call
from fleche.digest import digest
from fleche.errors import FlecheWarning
from fleche.limits import SizeLimitedCache
from fleche.testing import CacheTests
from test_caches import OnPickleFiles
from limits_tasks import hit, page_result, sweep
from tests_support import cache_on

SPAWN = multiprocessing.get_context("spawn")
BIG = 10**9


class TestSizeLimitedCache(CacheTests):
    def wrap(self, store):
        return SizeLimitedCache(store, size_limit=BIG)


class TestSizeLimitedCacheOnPickleFiles(OnPickleFiles, TestSizeLimitedCache):
    pass


class TestSizeLimitedCacheOnSqlite(TestSizeLimitedCache):
    def make_store(self, tmp_path):
        return cache_on("sqlite", tmp_path)


def _store(kind, tmp_path):
    if kind == "h5":
        pytest.importorskip("bagofholding")
        from fleche.storage import CallBagOfHoldingH5File, ValueBagOfHoldingH5File

        return Cache(ValueBagOfHoldingH5File(tmp_path / "values"),
                     CallBagOfHoldingH5File(tmp_path / "calls"))
    return cache_on(kind, tmp_path)


def _page(i):
    return "r" * 5000 + str(i)


def _bytes_per_call(kind, tmp_path):
    """What one call of ``_page`` takes in a store of this kind (record and result)."""
    probe = _store(kind, tmp_path / "probe")
    probe.save(Call("page", {"i": 10}, module=__name__, result=_page(10)))
    return probe.usage().total


@pytest.mark.parametrize("kind", ["memory", "pickle", "index", "sqlite", "h5"])
def test_least_recently_used_calls_are_evicted(kind, tmp_path):
    per_call = _bytes_per_call(kind, tmp_path)
    store = _store(kind, tmp_path / "store")
    limited = SizeLimitedCache(store, size_limit=int(5.5 * per_call), touch_interval=0)

    @fleche(cache=limited)
    def page(i):
        return _page(i)

    for i in range(5):
        page(i)
    assert store.usage().total <= limited.size_limit  # five fit
    assert page(0) == _page(0)  # a hit: 0 is the most recently used now
    page(5)  # over the budget: the checks after this save (files, databases) evict
    if kind == "memory":
        limited.cull()  # memory writes no bytes the check could count: measure now
    assert [i for i in range(6) if page.contains(i)] == [0, 3, 4, 5]
    assert store.usage().total <= 0.9 * limited.size_limit
    values = set(store.values.list())  # the results of evicted calls went with them
    assert {digest(_page(i)) for i in (0, 3, 4, 5)} <= values
    assert not {digest(_page(i)) for i in (1, 2)} & values
    assert [page(i) for i in (0, 3, 4, 5)] == [_page(i) for i in (0, 3, 4, 5)]


@pytest.mark.parametrize("kind", ["memory", "pickle"])
def test_a_value_shared_by_two_calls_stays_while_one_needs_it(kind, tmp_path):
    store = _store(kind, tmp_path)
    shared, other = "s" * 5000, "o" * 5000
    a = store.save(Call("f", {"x": 1}, result=shared))
    b = store.save(Call("f", {"x": 2}, result=shared))
    c = store.save(Call("g", {"x": 3}, result=other))
    usage = store.usage()
    assert SizeLimitedCache(store, size_limit=usage.total).cull() == set()  # it fits
    exact = SizeLimitedCache(store, size_limit=usage.total - 1, cull_to=1.0)
    assert exact.cull() == {a}  # its record is enough; the shared value is b's too
    assert store.values.contains(digest(shared)) and store.load_result(b) == shared
    store.touch([c], time.time() + 10)  # c is used last: b goes next, and the value with it
    usage = store.usage()
    limited = SizeLimitedCache(store, size_limit=usage.total - 1, cull_to=1.0)
    assert limited.cull() == {b}
    assert not store.values.contains(digest(shared)) and store.load_result(c) == other


def test_values_no_call_needs_go_first(tmp_path):
    store = _store("pickle", tmp_path)
    kept = store.save(Call("f", {"x": 1}, result="k" * 5000))
    orphan = store.values.save("o" * 5000)
    limited = SizeLimitedCache(store, size_limit=store.usage().total - 1)
    assert limited.cull() == set()
    assert not store.values.contains(orphan) and store.load_result(kept) == "k" * 5000


class BiggestFirst(SizeLimitedCache):
    """Evicts the biggest calls first, however recently they were used."""

    def victims(self, usage):
        return sorted(usage.calls, key=lambda k: -usage.calls[k].size)


def test_the_victim_choice_can_be_overridden(tmp_path):
    store = _store("pickle", tmp_path)
    big = store.save(Call("f", {"x": 1}, result="b" * 1500))  # inline: a big record
    small = [store.save(Call("f", {"x": i}, result=i)) for i in range(2, 6)]
    store.touch([big], time.time() + 10)  # the most recently used
    usage = store.usage()
    assert usage.calls[big].size > max(usage.calls[k].size for k in small)
    limited = BiggestFirst(store, size_limit=usage.total - 1)
    assert limited.cull() == {big}
    assert all(store.contains(k) for k in small)
    lru = SizeLimitedCache(store, size_limit=store.usage().total - 1)
    assert lru.cull() == {small[0]}


def test_settings_are_checked(tmp_path):
    store = _store("memory", tmp_path)
    for bad in ({"size_limit": 0}, {"size_limit": -5}, {"size_limit": "1GB"},
                {"size_limit": 10, "cull_to": 0}, {"size_limit": 10, "cull_to": 1.5},
                {"size_limit": 10, "check_interval": -1}, {"size_limit": 10, "touch_interval": None}):
        with pytest.raises(ValueError, match=next(iter(bad)) if len(bad) == 1 else list(bad)[1]):
            SizeLimitedCache(store, **bad)
    with pytest.raises(TypeError):
        SizeLimitedCache(store)  # a budget is needed


def test_a_store_that_cannot_say_its_size_warns_and_still_saves(tmp_path):
    from fleche.storage import CallMemory, KeyManagement, ValueMemory

    class Opaque(ValueMemory):
        """A value storage that does not say what its entries take (the base's default)."""

        usage = KeyManagement.usage
        __hash__ = ValueMemory.__hash__
        __eq__ = ValueMemory.__eq__

    store = Cache(Opaque(), CallMemory())
    limited = SizeLimitedCache(store, size_limit=100)
    with pytest.warns(FlecheWarning, match="cannot say how many bytes"):
        key = limited.save(Call("f", {"x": 1}, result="y" * 500))
    assert store.load_result(key) == "y" * 500
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not again at once: the next check waits a while
        limited.save(Call("f", {"x": 2}, result="z" * 500))
    with pytest.raises(NotImplementedError, match="cannot be size-limited"):
        limited.cull()


def _stored_pages(store):
    return {store.load(k).arguments["i"] for k in store.list()}


@pytest.mark.parametrize("kind", ["pickle", "index"])
def test_a_use_in_another_process_counts(kind, tmp_path):
    """Uses batched in another process reach the store when it ends (multiprocessing's
    finalizers, and atexit for a plain interpreter), and decide what this process evicts."""
    store = _store(kind, tmp_path)
    keys = [store.save(Call("page", {"i": i}, result=page_result(i))) for i in range(4)]
    child = SPAWN.Process(target=hit, args=(store, keys[0]))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    script = (
        "import pickle, sys; from limits_tasks import hit; "
        "store, key = pickle.loads(sys.stdin.buffer.read()); hit(store, key)"
    )
    import pickle

    subprocess.run(
        [sys.executable, "-c", script], input=pickle.dumps((store, keys[1])), check=True,
        cwd=str(__import__("pathlib").Path(__file__).parent), timeout=120,
    )
    usage = store.usage()
    assert usage.calls[keys[0]].used > usage.calls[keys[3]].used  # touched after all saves
    limited = SizeLimitedCache(store, size_limit=usage.total - 1, cull_to=0.6)
    assert limited.cull() == {keys[2], keys[3]}
    assert _stored_pages(store) == {0, 1}


@pytest.mark.parametrize("kind", ["pickle", "index", "sqlite"])
def test_processes_sharing_one_limited_store(kind, tmp_path):
    """Three processes call overlapping keys through one size-limited store: every call
    returns its result, nothing raises or warns, and the store ends within its budget."""
    store = _store(kind, tmp_path)
    limit = 12 * (4000 + 600)
    start = SPAWN.Event()
    orders = [list(range(30)) * 2, list(range(29, -1, -1)) * 2, list(range(0, 30, 2)) * 4]
    results = SPAWN.Queue()
    workers = [SPAWN.Process(target=sweep, args=(store, limit, order, start, results))
               for order in orders]
    for w in workers:
        w.start()
    start.set()
    outcomes = [results.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    for wrong, caught in outcomes:
        assert wrong == [] and caught == []
    limited = SizeLimitedCache(store, size_limit=limit)
    limited.cull()
    assert store.usage().total <= limit
    for key in store.list():  # whatever stayed is whole, or a clean miss after a race
        call = store.calls.load(key)
        try:
            assert store.load_result(key) == page_result(store.load(key).arguments["i"])
        except KeyError:
            assert call.result is not None


def test_a_call_saved_again_after_its_eviction_is_not_old_in_a_database(tmp_path):
    """A use row left from before a call was evicted does not date the call saved anew."""
    import datetime

    store = _store("sqlite", tmp_path)
    now = time.time()

    def at(seconds):
        start = datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()
        return Call("f", {"x": 1}, result="v" * 3000, metadata={"runtime": {"start": start}})

    key = store.save(at(now - 100))
    store.touch([key], now - 50)
    assert store.usage().calls[key].used == pytest.approx(now - 50)
    store.evict(key)
    store.save(at(now))
    assert store.usage().calls[key].used == pytest.approx(now)
