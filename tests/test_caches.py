"""Caches: save and load whole calls, stacks, read-only views, transfer and gc.

Every cache runs the shared contract (:class:`fleche.testing.CacheTests`) over memory storages
and over real pickle files (where entries can be damaged).
"""

import pickle

import pytest

from fleche.caches import (
    Cache,
    CacheStack,
    CacheWrapper,
    ReadOnlyCache,
    ReadOnlyError,
    memory_cache,
)
from fleche.call import Call, QueryCall
from fleche.digest import digest
from fleche.filtered import both
from fleche.storage import CallMemory, CallPickleFile, ValueMemory, ValuePickleFile
from fleche.testing import CacheTests
from tests_support import RacedValueMemory, RecordingCache, RecordingValueMemory


class OnPickleFiles:
    """A contract variant whose store is real pickle files, shared with other processes."""

    def make_store(self, tmp_path):
        return Cache(
            ValuePickleFile(root=tmp_path / "values", lock_timeout=30),
            CallPickleFile(root=tmp_path / "calls", lock_timeout=30),
        )


class TestCache(CacheTests):
    def wrap(self, store):
        return store


class TestCacheOnPickleFiles(OnPickleFiles, TestCache):
    pass


class TestCacheStack(CacheTests):
    def wrap(self, store):
        return CacheStack([memory_cache(), store])


class TestCacheStackOnPickleFiles(OnPickleFiles, TestCacheStack):
    pass


class TestCacheWrapper(CacheTests):
    def wrap(self, store):
        return CacheWrapper(store)


class TestCacheWrapperOnPickleFiles(OnPickleFiles, TestCacheWrapper):
    pass


class TestReadOnlyCache(CacheTests):
    writable = False

    def wrap(self, store):
        return ReadOnlyCache(store)


class TestReadOnlyCacheOnPickleFiles(OnPickleFiles, TestReadOnlyCache):
    pass


class TestReadOnlyStack(CacheTests):
    """A stack of read-only layers refuses writes as a whole."""

    writable = False

    def wrap(self, store):
        return CacheStack([ReadOnlyCache(memory_cache()), ReadOnlyCache(store)])


class TestFilteredCache(CacheTests):
    """A view that every call matches is a read-only cache like any other."""

    writable = False

    def wrap(self, store):
        return store.filter(QueryCall())


class TestFilteredCacheOnPickleFiles(OnPickleFiles, TestFilteredCache):
    pass


class TestFilteredStack(CacheTests):
    writable = False

    def wrap(self, store):
        return CacheStack([memory_cache(), store]).filter(QueryCall(module="fleche.testing"))


def record(x, result, name="f"):
    return Call(name, {"x": x}, result=result, metadata={"runtime": {"host": "here"}})


def test_save_and_load_a_call():
    cache = memory_cache()
    key = cache.save(record([1, 2], {"sum": 3}))
    assert key == record([1, 2], None).to_lookup_key()
    assert cache.contains(key) and cache.contains(key[:6])
    call = cache.load(key[:6])
    assert call.result == {"sum": 3}
    assert call.arguments == {"x": [1, 2]}
    assert call.metadata == {"runtime": {"host": "here"}}
    assert call.to_lookup_key() == key
    assert cache.load_result(key) == {"sum": 3}
    # Values live in the value storage, the record in the call storage.
    assert cache.values.load(digest([1, 2])) == [1, 2]
    assert cache.calls.load(key).result == digest({"sum": 3})


def test_arguments_load_lazily():
    cache = memory_cache()
    key = cache.save(record("arg", "res"))
    cache.values.evict(digest("arg"))
    call = cache.load(key)  # result only: the argument is not touched yet
    assert call.result == "res"
    assert call.to_lookup_key() == key
    with pytest.raises(KeyError):
        call.arguments["x"]


def test_missing_and_evicted():
    cache = memory_cache()
    key = cache.save(record(1, 2))
    cache.evict(key[:5])
    assert not cache.contains(key)
    with pytest.raises(KeyError):
        cache.load(key)
    with pytest.raises(KeyError):
        cache.load_result(key)
    with pytest.raises(KeyError):
        cache.evict(key)


def test_dangling_record_is_a_miss():
    cache = memory_cache()
    key = cache.save(record(1, "gone"))
    cache.values.evict(digest("gone"))
    with pytest.raises(KeyError):
        cache.load_result(key)


def test_query():
    cache = memory_cache()
    for x in range(6):
        cache.save(record(x, x * x, name="sq" if x % 2 else "other"))
    assert sorted(c.result for c in cache.query()) == [0, 1, 4, 9, 16, 25]
    assert [c.result for c in cache.query(x=3)] == [9]
    assert sorted(c.result for c in cache.query(QueryCall(name="sq"))) == [1, 9, 25]
    assert [c.result for c in cache.query(QueryCall(name="sq"), x=5)] == [25]
    assert list(cache.query(QueryCall(name="sq"), x=4)) == []


def test_transfer_copies_everything_once():
    src, dst = memory_cache(), memory_cache()
    keys = [src.save(record([x, [x]], {"r": x})) for x in range(5)]
    dst.save(record([0, [0]], {"r": 0}))
    assert src.transfer(dst) == 4
    assert src.transfer(dst) == 0
    for x, key in enumerate(keys):
        assert dst.load(key).result == {"r": x}
        assert dst.load(key).arguments["x"] == [x, [x]]


def test_transfer_reports_progress_over_every_call():
    src, dst = memory_cache(), memory_cache()
    for x in range(3):
        src.save(record(x, x))
    dst.save(record(1, 1))
    seen = []
    assert src.transfer(dst, progress=lambda done, total: seen.append((done, total))) == 2
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert ReadOnlyCache(src).transfer(memory_cache(), progress=lambda *_: None) == 3


def test_gc_removes_only_unreachable_values():
    cache = memory_cache()
    shared = [1, [2, 3]]
    keep = cache.save(record(shared, {"out": shared}))
    drop = cache.save(record("tmp", ["garbage", 99]))
    orphan = cache.values.save({"never": "referenced"})
    cache.evict(drop)
    before = set(cache.values.list())
    garbage = {orphan, digest("referenced"), digest("tmp"), digest(["garbage", 99]),
               digest("garbage"), digest(99)}
    assert set(cache.gc(dry_run=True)) == garbage
    assert set(cache.values.list()) == before  # dry run removed nothing
    assert set(cache.gc()) == garbage
    assert set(cache.values.list()) == before - garbage
    assert cache.load(keep).result == {"out": shared}
    assert cache.load(keep).arguments["x"] == shared
    assert cache.gc() == set()


def test_gc_reports_only_what_it_evicted():
    """A value another process evicts between gc's listing and its eviction is not reported."""
    values = RacedValueMemory()
    cache = Cache(values, CallMemory())
    cache.save(record("kept", "result"))
    orphans = {values.save("orphan one"), values.save("orphan two")}
    assert cache.gc(dry_run=True) == orphans  # what it would evict
    object.__setattr__(values, "victim", digest("orphan one"))
    assert cache.gc() == {digest("orphan two")}
    assert set(values.list()) == {digest("kept"), digest("result")}


def test_cache_operations_enter_the_operation_context():
    """contains, expand and shrink run inside the cache's and the storage's operation context."""
    values = RecordingValueMemory()
    cache = RecordingCache(values, CallMemory())
    key = cache.save(record(1, 2))
    for operation in (cache.contains, cache.expand, cache.shrink):
        cache.entered.clear()
        operation(key[:8] if operation is cache.expand else key)
        assert cache.entered, operation.__name__
    stored = values.save("x")
    values.entered.clear()
    assert values.shrink(stored) == stored[:4]
    assert values.entered == [(stored, "read")]


def test_shrink_of_a_key_no_layer_holds():
    fast, slow = memory_cache(), memory_cache()
    stored = slow.save(record(1, 1))
    for cache in (slow, CacheStack([fast, slow])):
        assert cache.shrink(stored) == stored[:4]
        with pytest.raises(KeyError):
            cache.shrink(record(2, 2).to_lookup_key())


def test_cache_stack_back_fills_and_writes_through():
    fast, slow = memory_cache(), memory_cache()
    key = slow.save(record(7, 49))
    stack = CacheStack([fast, slow])
    assert not fast.contains(key)
    assert stack.load_result(key) == 49
    assert fast.contains(key) and fast.load_result(key) == 49
    new = stack.save(record(8, 64))
    assert fast.contains(new) and slow.contains(new)
    assert set(stack.list()) == {key, new}
    assert stack.expand(new[:6]) == new
    stack.evict(new)
    assert not fast.contains(new) and not slow.contains(new)
    with pytest.raises(KeyError):
        stack.load(new)


def test_cache_stack_write_back_and_flush():
    fast, slow = memory_cache(), memory_cache()
    stack = CacheStack([fast, slow], write_through=False)
    key = stack.save(record(1, 1))
    assert fast.contains(key) and not slow.contains(key)
    assert stack.flush() == 1
    assert slow.load_result(key) == 1
    with pytest.raises(ValueError):
        CacheStack([])


def test_read_only_cache():
    inner = memory_cache()
    key = inner.save(record(2, 4))
    ro = ReadOnlyCache(inner)
    assert ro.load_result(key) == 4 and ro.contains(key) and not ro.writable
    assert [c.result for c in ro.query(x=2)] == [4]
    with pytest.raises(ReadOnlyError, match="read-only"):
        ro.save(record(3, 9))
    with pytest.raises(ReadOnlyError):
        ro.evict(key)
    with pytest.raises(PermissionError):
        ro.gc()
    assert inner.contains(key)


def test_caches_pickle():
    cache = Cache(ValueMemory(), CallMemory())
    key = cache.save(record("p", "q"))
    for c in (cache, CacheStack([memory_cache(), cache]), ReadOnlyCache(cache)):
        copy = pickle.loads(pickle.dumps(c))
        assert copy.load_result(key) == "q"


def test_contains_many_through_caches_and_stacks():
    fast, slow = memory_cache(), memory_cache()
    in_fast = fast.save(record(1, "a"))
    in_slow = slow.save(record(2, "b"))
    missing = record(3, None).to_lookup_key()
    stack = CacheStack([fast, slow], write_through=False)
    assert fast.contains_many([in_fast, in_slow, missing]) == {in_fast}
    assert stack.contains_many([in_fast, in_slow[:8], missing]) == {in_fast, in_slow}
    assert ReadOnlyCache(slow).contains_many([in_slow, missing]) == {in_slow}


def test_a_view_of_a_view_asks_for_both_templates_at_once():
    cache = memory_cache()
    keys = {(x, n): cache.save(record(x, x, name=n)) for x in range(3) for n in ("f", "g")}
    view = cache.filter(QueryCall(name="f")).filter(QueryCall(arguments={"x": digest(1)}))
    assert list(view.list()) == [keys[(1, "f")]]
    assert view.query(x=1).count() == 1 and view.query(x=2).empty()
    assert view.query(QueryCall(name="g")).empty()
    same = both(QueryCall(arguments={"x": 1}), QueryCall(arguments={"x": digest(1)}))
    assert digest(same.arguments["x"]) == digest(1)  # a value and its digest agree
    assert both(QueryCall(arguments={"x": 1}), QueryCall(arguments={"x": 2})) is None
    host = [QueryCall(metadata={"runtime": {"host": h}}) for h in "ab"]
    assert both(*host) is None and both(host[0], QueryCall(metadata={"other": {}})).metadata == {
        "runtime": {"host": "a"}, "other": {}
    }
    assert both(QueryCall(version="1"), QueryCall(name="f")) == QueryCall(name="f", version="1")
