"""The @fleche decorator: hits skip the body, keys follow the options, caching never breaks a call."""

import inspect
import pickle
import threading
import warnings

import pytest

import fleche as fleche_pkg
from fleche import FlecheWarning, fleche
from fleche.caches import Cache, ReadOnlyCache, memory_cache
from fleche.decorator import active_cache, get_default_cache, set_default_cache
from fleche.storage import CallMemory
from tests_support import PickledValueMemory

CALLS = []


@fleche
def module_level(x, y=1):
    """Add two numbers."""
    CALLS.append((x, y))
    return x + y


def counting(cache, **options):
    runs = []

    @fleche(cache=cache, **options)
    def work(a, b=2, *, scale=1):
        """Do some work."""
        runs.append((a, b, scale))
        return {"value": (a + b) * scale}

    return work, runs


def test_hit_does_not_run_the_body():
    work, runs = counting(memory_cache())
    assert work(1) == {"value": 3}
    assert work(1) == {"value": 3}
    assert work(1, 2) == {"value": 3}  # same bound arguments: defaults are applied
    assert work(a=1) == {"value": 3}
    assert runs == [(1, 2, 1)]
    assert work(2) == {"value": 4}
    assert len(runs) == 2


def test_wrapper_keeps_identity():
    work, _ = counting(memory_cache())
    assert work.__name__ == "work"
    assert work.__doc__ == "Do some work."
    assert str(inspect.signature(work)) == "(a, b=2, *, scale=1)"
    assert fleche_pkg.fleche is fleche


def test_helper_methods():
    cache = memory_cache()
    work, runs = counting(cache)
    assert not work.contains(5)
    with pytest.raises(KeyError):
        work.load(5)
    call = work.call(5, scale=3)
    assert call.arguments == {"a": 5, "b": 2, "scale": 3}
    assert work.digest(5, scale=3) == call.to_lookup_key()
    work(5, scale=3)
    assert work.contains(5, scale=3) and work.load(5, scale=3) == {"value": 21}
    work(6)
    assert [c.result for c in work.query(a=5)] == [{"value": 21}]
    assert len(list(work.query())) == 2
    assert runs == [(5, 2, 3), (6, 2, 1)]


def test_bad_arguments_raise_as_usual():
    work, runs = counting(memory_cache())
    with pytest.raises(TypeError):
        work(1, 2, 3)
    assert runs == []


def test_version_and_code_and_module_options():
    cache = memory_cache()
    source_v1 = "def model(x):\n    return x + 1\n"
    source_v2 = "def model(x):\n    return x + 100\n"

    def define(source, **options):
        namespace = {"__name__": "lab.models"}
        exec(source, namespace)
        return fleche(cache=cache, **options)(namespace["model"])

    # Without hash_code an edited body still hits the old entry...
    assert define(source_v1)(1) == 2
    assert define(source_v2)(1) == 2
    # ...with hash_code the edit is a miss.
    assert define(source_v1, hash_code=True)(1) == 2
    assert define(source_v2, hash_code=True)(1) == 101
    assert define(source_v2, hash_code=True).digest(1) != define(source_v1, hash_code=True).digest(1)
    # version does the same by hand.
    assert define(source_v2, version="2")(1) == 101
    assert define(source_v2, version="2").digest(1) != define(source_v2, version="3").digest(1)
    assert define(source_v2, version="2", hash_version=False).digest(1) == define(source_v2).digest(1)
    # hash_module=False: the same function found under another module name keeps its key.
    namespace = {"__name__": "elsewhere"}
    exec(source_v1, namespace)
    moved = fleche(cache=cache, hash_module=False)(namespace["model"])
    assert moved.digest(1) == define(source_v1, hash_module=False).digest(1)
    assert moved.digest(1) != define(source_v1).digest(1)


def test_ignore_leaves_arguments_out_of_the_key():
    cache = memory_cache()
    runs = []

    @fleche(cache=cache, ignore=("verbose",))
    def fit(data, verbose=False):
        runs.append(verbose)
        return sum(data)

    assert fit([1, 2], verbose=True) == 3
    assert fit([1, 2], verbose=False) == 3
    assert runs == [True]
    assert "verbose" not in fit.call([1, 2]).arguments
    with pytest.raises(ValueError, match="not parameters"):
        fleche(ignore=("nope",))(lambda x: x)


def test_exceptions_are_not_cached():
    runs = []

    @fleche(cache=memory_cache())
    def fails(x):
        runs.append(x)
        raise RuntimeError(f"boom {x}")

    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom 1"):
            fails(1)
    assert runs == [1, 1]
    assert not fails.contains(1)


def test_indigestible_arguments_run_uncached_with_a_warning():
    runs = []

    @fleche(cache=memory_cache())
    def uses_lock(lock):
        runs.append(lock)
        return 1

    lock = threading.Lock()
    with pytest.warns(FlecheWarning, match="uncached.*lock"):
        assert uses_lock(lock) == 1
    with pytest.warns(FlecheWarning):
        assert uses_lock(lock) == 1
    assert len(runs) == 2


def test_unstorable_result_is_returned_with_a_warning_and_not_half_written():
    cache = Cache(PickledValueMemory(), CallMemory())

    @fleche(cache=cache)
    def make_lock(n):
        return threading.Lock()

    with pytest.warns(FlecheWarning, match="lock"):
        result = make_lock(1)
    assert hasattr(result, "acquire")
    assert not make_lock.contains(1)
    assert list(cache.calls.list()) == []


def test_metadata_records_when_and_where():
    work, _ = counting(memory_cache())
    work(3)
    (call,) = work.query(a=3)
    runtime = call.metadata["runtime"]
    assert set(runtime) >= {"start", "wall_time", "host", "pid"}
    import os

    assert runtime["pid"] == os.getpid() and runtime["wall_time"] >= 0
    assert "T" in runtime["start"]


def test_cache_resolution_order():
    explicit, active, default = memory_cache(), memory_cache(), memory_cache()
    work_explicit, _ = counting(explicit)
    work_free, _ = counting(None)
    previous = get_default_cache()
    try:
        set_default_cache(default)
        work_free(1)
        assert default.contains(work_free.digest(1))
        with fleche_pkg.cache(active):
            assert active_cache() is active
            work_free(2)
            work_explicit(3)
        assert active.contains(work_free.digest(2)) and not default.contains(work_free.digest(2))
        assert explicit.contains(work_explicit.digest(3))
        assert not active.contains(work_explicit.digest(3))
        assert active_cache() is default
        set_default_cache(None)
        assert active_cache() is active_cache()  # the in-memory fallback, created once
    finally:
        set_default_cache(previous)
    with pytest.raises(TypeError):
        fleche_pkg.cache("not a cache")


def test_active_cache_is_per_thread():
    mine = memory_cache()
    seen = {}
    with fleche_pkg.cache(mine):
        t = threading.Thread(target=lambda: seen.setdefault("other", active_cache()))
        t.start()
        t.join()
        assert active_cache() is mine
    assert seen["other"] is not mine


def test_read_only_cache_computes_without_saving():
    inner = memory_cache()
    work, runs = counting(inner)
    work(1)
    reader, reader_runs = counting(ReadOnlyCache(inner))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reader(1) == {"value": 3}
        assert reader(9) == {"value": 11}
    assert reader_runs == [(9, 2, 1)]
    assert not inner.contains(reader.digest(9))


def test_decorated_function_and_cache_pickle():
    CALLS.clear()
    cache = memory_cache()
    with fleche_pkg.cache(cache):
        module_level(1)
        restored = pickle.loads(pickle.dumps(module_level))
        assert restored is module_level
        assert restored(1) == 2
    assert CALLS == [(1, 1)]
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.load_result(module_level.digest(1)) == 2


def test_async_functions_are_refused():
    async def coro():
        return 1

    with pytest.raises(TypeError, match="async"):
        fleche(coro)


def test_corrupt_entry_is_a_miss_that_gets_overwritten(tmp_path):
    from fleche.storage import CallPickleFile, ValuePickleFile

    cache = Cache(ValuePickleFile(root=tmp_path / "v"), CallPickleFile(root=tmp_path / "c"))
    runs = []

    @fleche(cache=cache)
    def compute(x):
        runs.append(x)
        return [x, x]

    compute(1)
    path = cache.calls._path(compute.digest(1))
    with open(path, "r+b") as f:  # flip a byte in the payload
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(FlecheWarning, match="corrupt"):
        assert compute(1) == [1, 1]
    assert runs == [1, 1]
    assert compute(1) == [1, 1] and runs == [1, 1]  # repaired: a hit again


class Resource:
    """An argument with a digest (its name) that cannot be pickled (it holds a lock)."""

    def __init__(self, name):
        self.name = name
        self.lock = threading.Lock()

    def __digest__(self):
        return self.name


def test_an_unstorable_argument_is_named_in_the_warning(tmp_path):
    from fleche.storage import CallPickleFile, ValuePickleFile

    cache = Cache(ValuePickleFile(root=tmp_path / "v"), CallPickleFile(root=tmp_path / "c"))

    @fleche(cache=cache)
    def use(resource, n):
        return n + 1

    with pytest.warns(FlecheWarning) as warned:
        assert use(Resource("db"), 2) == 3
    (message,) = [str(w.message) for w in warned]
    assert "argument 'resource'" in message and "Resource" in message
    assert "result" not in message
    assert list(cache.calls.list()) == []
