"""``f.fleche``: a decorated function's cache operations, ``fleche.cache()`` as a getter,
query templates bound like calls, and arguments given by a stored value's digest
(``fleche.D``), over memory, pickle-file and SQLite stores."""

import dataclasses
import threading

import pytest

import fleche
from fleche import D, fleche as cached
from fleche.caches import Cache, ReadOnlyCache, ReadOnlyError, memory_cache
from fleche.call import Call, QueryCall
from fleche.digest import digest
from fleche.errors import AmbiguousDigestError, LockTimeout
from fleche.namespace import FunctionNamespace
from fleche.query import QueryIterator
from fleche.storage import CallPickleFile, ValuePickleFile
from tests_support import cache_on


@pytest.fixture(params=["memory", "pickle", "sqlite"])
def store(request, tmp_path):
    return cache_on(request.param, tmp_path)


def counted(cache, version=None, ignore=()):
    """A decorated ``power(base, exponent=2, verbose=False)`` and the list of its runs."""
    runs = []

    @cached(cache=cache, version=version, ignore=ignore)
    def power(base, exponent=2, verbose=False):
        runs.append((base, exponent))
        return base**exponent

    return power, runs


def test_namespace_bundles_the_cache_operations(store):
    power, runs = counted(store)
    ns = power.fleche
    assert isinstance(ns, FunctionNamespace) and ns.cache is store
    assert power(3) == 9 and power(2, exponent=5) == 32
    assert ns.contains(3) and ns.contains(base=3, exponent=2) and not ns.contains(4)
    assert ns.load(2, 5) == 32 and ns.digest(3) == power.digest(3)
    call = ns.call(3)
    assert isinstance(call, Call) and call.arguments == {"base": 3, "exponent": 2, "verbose": False}
    assert call.to_lookup_key() == ns.digest(3) and store.contains(ns.digest(3))
    assert isinstance(ns.query(), QueryIterator) and ns.query().count() == 2
    ns.evict(3)
    assert not ns.contains(3) and ns.query().count() == 1
    with pytest.raises(KeyError):
        ns.evict(3)
    with pytest.raises(KeyError):
        ns.load(3)
    assert runs == [(3, 2), (2, 5)]


def test_wrapper_keeps_the_short_forms():
    power, _ = counted(memory_cache())
    ns = power.fleche
    for name in ("digest", "contains", "load", "call", "query", "clear", "refresh"):
        assert getattr(power, name) == getattr(ns, name), name


def test_namespace_follows_the_active_cache():
    @cached
    def double(x):
        return 2 * x

    first, second = memory_cache(), memory_cache()
    with fleche.cache(first):
        double(1)
        assert double.fleche.cache is first and double.fleche.contains(1)
    with fleche.cache(second):
        assert double.fleche.cache is second and not double.fleche.contains(1)


def test_cache_without_argument_is_the_getter():
    c = memory_cache()
    outside = fleche.cache()
    assert outside is fleche.active_cache()
    with fleche.cache(c) as active:
        assert active is c and fleche.cache() is c
        fleche.cache(None)  # clearing still works, and takes effect at once
        assert fleche.cache() is outside
    assert fleche.cache() is outside
    with pytest.raises(TypeError, match="needs a cache"):
        fleche.cache("not a cache")


def test_query_binds_like_a_call_without_defaults(store):
    power, _ = counted(store)
    for base, exponent in [(1, 2), (2, 2), (2, 3), (3, 3)]:
        power(base, exponent)
    assert power.query(2).count() == 2  # positional; exponent not given: any exponent
    assert sorted(c.arguments["base"] for c in power.query(exponent=3)) == [2, 3]
    assert power.query(2, 3).only().result == 8
    assert power.query(base=2, exponent=3).only().result == 8
    assert power.query().count() == 4
    assert power.query(verbose=True).empty()  # verbose is stored (False) unless ignored
    with pytest.raises(TypeError):
        power.query(1, 2, False, "too many")
    with pytest.raises(TypeError):
        power.query(nope=1)


def test_query_leaves_ignored_arguments_out():
    power, _ = counted(memory_cache(), ignore=("verbose",))
    power(2, verbose=True)
    assert power.query(2, verbose=False).only().result == 4


def plain(a, b=1, *rest, c=2):
    return a


def test_query_call_from_call():
    template = QueryCall.from_call(plain, 5, c=3)
    assert template == QueryCall(name="plain", module=__name__, arguments={"a": 5, "c": 3})
    assert QueryCall.from_call(plain) == QueryCall(name="plain", module=__name__, arguments={})
    assert QueryCall.from_call(plain, 1, 2, 3).arguments == {"a": 1, "b": 2, "rest": (3,)}
    with pytest.raises(TypeError):
        QueryCall.from_call(plain, d=4)
    power, _ = counted(memory_cache(), version="7", ignore=("verbose",))
    template = QueryCall.from_call(power, 2, verbose=True)
    assert template.version == "7" and template.arguments == {"base": 2}
    assert template.name == "counted.<locals>.power" and template.code_digest is not None
    assert template == power.fleche.template(2)


def test_clear_evicts_every_call_of_the_function_only(store):
    def work(x):
        return -x

    v1, v2 = cached(version="1", cache=store)(work), cached(version="2", cache=store)(work)
    v1(1), v1(2), v2(3)
    power, _ = counted(store)
    power(2)
    stranger = store.save(Call(v2.call(9).name, {"x": 9}, module="elsewhere", result=0))
    assert v2.fleche.clear() == 3  # both versions' calls
    assert v1.query().empty() and v2.query().empty() and v2.clear() == 0
    assert power.fleche.contains(2) and store.contains(stranger)
    assert store.values.contains(digest(1)) or store.calls.keeps_inline_values  # until gc


def test_clear_of_a_function_without_module_leaves_namesakes():
    cache = memory_cache()

    @cached(cache=cache, hash_module=False)
    def solo(x):
        return x

    solo(1)
    namesake = cache.save(Call(solo.call(1).name, {"x": 2}, module="other.module", result=2))
    assert solo.clear() == 1 and cache.contains(namesake)


def test_refresh_recomputes_and_replaces(store):
    counter = []

    @cached(cache=store)
    def tick(x):
        counter.append(x)
        return (x, len(counter))

    assert tick(1) == (1, 1) and tick(1) == (1, 1)
    before = store.load(tick.digest(1)).metadata["runtime"]["start"]
    assert tick.refresh(1) == (1, 2) and counter == [1, 1]
    assert tick(1) == (1, 2) and tick.load(1) == (1, 2)  # the entry was replaced
    assert store.load(tick.digest(1)).metadata["runtime"]["start"] >= before
    assert tick.fleche.refresh(5) == (5, 3) and tick(5) == (5, 3)  # also when not stored
    assert tick.query().count() == 2


PROBE = {}  # the storage handle guarded() tries the lock with, and what it saw


def try_lock(key):
    try:
        with PROBE["storage"].locked(key):
            PROBE["seen"].append("free")
    except LockTimeout:
        PROBE["seen"].append("held")


@cached(compute_once=True)
def guarded(x):
    other = threading.Thread(target=try_lock, args=(guarded.digest(x),))
    other.start()
    other.join()
    return x


def test_refresh_holds_the_lock_with_compute_once(tmp_path):
    store = Cache(ValuePickleFile(root=tmp_path / "v"), CallPickleFile(root=tmp_path / "c"))
    PROBE.update(storage=dataclasses.replace(store.calls, lock_timeout=0.05), seen=[])
    with fleche.cache(store):
        assert guarded.refresh(3) == 3
        try_lock(guarded.digest(3))
    assert PROBE["seen"] == ["held", "free"]  # held by refresh while it computed, then free


def test_refresh_refuses_a_read_only_cache():
    inner = memory_cache()
    power, runs = counted(ReadOnlyCache(inner))
    with pytest.raises(ReadOnlyError, match="refresh"):
        power.refresh(2)
    assert runs == []


# -- fleche.D -----------------------------------------------------------------------------


def test_an_argument_given_by_digest_is_the_stored_value(store):
    runs = []

    @cached(cache=store)
    def total(values, start=0):
        runs.append((values, start))
        return sum(values) + start

    values = list(range(1000))  # too big to be kept inline: in the value storage
    total(values)
    key = store.calls.load(total.digest(values)).arguments["values"]
    assert key == digest(values) and store.values.contains(key)
    assert total(D(key[:6])) == sum(values) and len(runs) == 1  # the same call: a hit
    assert total.digest(D(key[:6])) == total.digest(values)
    assert total(D(key), start=1) == sum(values) + 1 and runs[-1] == (values, 1)
    assert total(values=D(key[:5]), start=D(digest(1)[:8])) == sum(values) + 1  # kwargs too
    assert len(runs) == 2
    assert total.fleche.contains(D(key[:8]), 1) and total.query(D(key[:8])).count() == 2


def test_results_and_inline_values_are_given_by_digest_too(store):
    power, _ = counted(store)
    power(7)  # 7 and 49 are small: kept inline in pickle and SQLite call records
    record = store.calls.load(power.digest(7))
    assert power(D(record.result[:6]), 1) == 49
    assert power.load(D(record.arguments["base"][:6])) == 49


def test_a_wrong_prefix_names_it_and_the_argument(store):
    power, runs = counted(store)
    power(1)
    missing = digest("never stored")[:8]
    with pytest.raises(KeyError, match=f"argument 'base'.*{missing}"):
        power(D(missing))
    with pytest.raises(KeyError, match=f"argument 'exponent'.*{missing}"):
        power(2, exponent=D(missing))
    assert runs == [(1, 2)]


def test_an_ambiguous_prefix_names_the_argument():
    cache = memory_cache()
    power, runs = counted(cache)
    by_prefix = {}
    for i in range(100_000):
        prefix = digest(i)[:4]
        if prefix in by_prefix:
            break
        by_prefix[prefix] = i
    power(by_prefix[prefix]), power(i)
    with pytest.raises(AmbiguousDigestError, match=f"argument 'base'.*{prefix}.*at least"):
        power(D(prefix))
    assert power(D(digest(i)[:12])) == i * i and len(runs) == 2


def test_d_checks_its_key_at_once():
    with pytest.raises(ValueError, match="too short"):
        D("abc")
    with pytest.raises(ValueError, match="invalid key"):
        D("not hex!")
    with pytest.raises(TypeError):
        D(1234)
    assert repr(D("ab12")) == "D('ab12')"
