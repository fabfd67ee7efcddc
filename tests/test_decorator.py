"""The @fleche decorator: hits skip the body, keys follow the options, caching never breaks a call."""

import datetime
import functools
import inspect
import pickle
import threading
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fleche as fleche_pkg
from fleche import FlecheWarning, fleche
from fleche.caches import Cache, ReadOnlyCache, memory_cache
from fleche.decorator import active_cache, set_default_cache
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
    previous = fleche_pkg.decorator._default  # what set_default_cache set (not FLECHE_CACHE)
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


def test_async_generators_are_refused():
    # async def functions are cached now (tests/test_async.py); generators have no one result
    async def numbers():
        yield 1

    with pytest.raises(TypeError, match="async"):
        fleche(numbers)


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


# -- keys that identify what a function computes ------------------------------------------------

MODULE_CACHE = memory_cache()
TEN_TIMES = fleche(cache=MODULE_CACHE)(lambda x: 10 * x)
TWENTY_TIMES = fleche(cache=MODULE_CACHE)(lambda x: 20 * x)


def test_lambdas_of_one_module_have_keys_of_their_own():
    assert (TEN_TIMES(2), TWENTY_TIMES(2)) == (20, 40)
    assert TEN_TIMES.digest(2) != TWENTY_TIMES.digest(2)
    cache = memory_cache()
    one, two = fleche(cache=cache)(lambda x: x + 1), fleche(cache=cache)(lambda x: x + 2)
    assert (one(1), two(1)) == (2, 3)


class Tally(list):
    """A record of runs that functions may capture without it taking part in their keys."""

    def __digest__(self):
        return "tally"


@pytest.mark.parametrize("hash_code", [False, True])
def test_functions_made_by_one_factory_are_keyed_by_what_they_capture(hash_code):
    cache = memory_cache()
    runs = Tally()

    def make(k):
        @fleche(cache=cache, hash_code=hash_code)
        def scaled(x):
            runs.append((k, x))
            return k * x

        return scaled

    assert (make(2)(5), make(3)(5)) == (10, 15)
    assert make(2)(5) == 10
    assert runs == [(2, 5), (3, 5)]


def test_closures_keyed_by_what_they_capture_store_in_sql(tmp_path):
    pytest.importorskip("sqlalchemy")
    from fleche.storage import Sql, ValuePickleFile

    cache = Cache(ValuePickleFile(tmp_path / "values"), Sql(str(tmp_path / "calls.sqlite")))
    runs = Tally()

    def make(k):
        @fleche(cache=cache)
        def scaled(x):
            runs.append(x)
            return k * x

        return scaled

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (make(2)(5), make(3)(5), make(2)(5)) == (10, 15, 10)
    assert runs == [5, 5]


def _apply_cache(kind, tmp_path):
    return memory_cache() if kind == "memory" else fleche_pkg.open(f"{tmp_path}?format=cloudpickle")


@pytest.mark.parametrize("kind", ["memory", "cloudpickle"])
def test_function_arguments_differing_only_in_defaults_get_their_own_results(kind, tmp_path):
    runs = []

    @fleche(cache=_apply_cache(kind, tmp_path))
    def apply(fn):
        runs.append(fn)
        return fn()

    assert apply(lambda k=1: k) == 1
    assert apply(lambda k=2: k) == 2
    assert apply(lambda *, k=1: k) == 1
    assert apply(lambda *, k=2: k) == 2
    assert apply(lambda k=1: k) == 1
    assert len(runs) == 4


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(json_like, json_like)
def test_decorated_function_arguments_never_return_another_functions_result(a, b):
    @fleche(cache=memory_cache())
    def apply(fn):
        return fn()

    assert apply(lambda k=a: k) == a
    assert apply(lambda k=b: k) == b
    assert apply(lambda *, k=a: k) == a
    assert apply(lambda *, k=b: k) == b


def test_hash_code_covers_the_globals_the_body_reads():
    namespace = {"__name__": "lab.scaling", "FACTOR": 2, "math": __import__("math")}
    exec("def scale(x):\n    return FACTOR * math.floor(x)\n", namespace)
    cache = memory_cache()
    scale = fleche(cache=cache, hash_code=True)(namespace["scale"])
    assert scale(5) == 10
    namespace["FACTOR"] = 3  # rebinding a global the body reads: a new key
    assert scale(5) == 15
    namespace["FACTOR"] = 2
    assert scale(5) == 10
    assert len(list(cache.calls.list())) == 2
    # Without hash_code a function known by its name is keyed by that name alone.
    assert scale.digest(5) != fleche(cache=cache)(namespace["scale"]).digest(5)


def test_captured_values_are_read_at_each_call():
    cache = memory_cache()
    state = {"k": 2}

    def make():
        k = state["k"]

        @fleche(cache=cache)
        def scaled(x):
            return k * x

        def rebind(value):
            nonlocal k
            k = value

        return scaled, rebind

    scaled, rebind = make()
    assert scaled(5) == 10
    rebind(3)
    assert scaled(5) == 15
    rebind(2)
    assert scaled(5) == 10
    assert len(list(cache.calls.list())) == 2


class Scaler:
    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return self.k * x

    def times(self, x):
        return self.k * x


def power(base, exponent):
    return base**exponent


def test_partials_and_callable_instances_are_keyed_by_what_they_call():
    cache = memory_cache()
    squares, cubes = fleche(cache=cache)(functools.partial(power, exponent=2)), fleche(
        cache=cache
    )(functools.partial(power, exponent=3))
    assert (squares(3), cubes(3)) == (9, 27)
    assert squares.digest(3) != cubes.digest(3)
    assert squares.call(3).arguments == {"base": 3, "exponent": 2}
    scaler = Scaler(2)
    scaled = fleche(cache=cache)(scaler)
    assert scaled(5) == 10
    scaler.k = 3
    assert scaled(5) == 15
    assert fleche(cache=cache)(Scaler(2)).digest(5) != scaled.digest(5)
    assert fleche(cache=cache)(Scaler(3)).digest(5) == scaled.digest(5)
    times = fleche(cache=cache)(Scaler(4).times)
    assert times(5) == 20 and fleche(cache=cache)(Scaler(5).times)(5) == 25


def test_a_decorated_function_digests_as_the_function_it_wraps():
    from fleche import digest

    cache = memory_cache()

    def local(x):
        return x + 1

    decorated = fleche(cache=cache)(local)
    assert digest(decorated) == digest(local)
    assert digest(module_level) == digest(module_level.__wrapped__)

    @fleche(cache=cache)
    def apply(fn, x):
        return fn(x)

    assert apply(decorated, 1) == 2
    assert apply.digest(decorated, 1) == apply.digest(local, 1)
    assert apply.contains(local, 1)


# -- an argument whose digest fails: the call runs uncached ---------------------------------------


class RaisingDigest:
    def __init__(self, error):
        self.error = error

    def __digest__(self):
        raise self.error


class Hooked:
    pass


def _refuse(value):
    raise ValueError("hook refused")


def _cyclic_list():
    value = [1]
    value.append(value)
    return value


def _cyclic_dict():
    value = {}
    value["me"] = [value]
    return value


def _deep_list():
    value = []
    for _ in range(100_000):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (_cyclic_list, "cycle"),
        (_cyclic_dict, "cycle"),
        (_deep_list, "too deep"),
        (lambda: RaisingDigest(RuntimeError("broken digest")), "RuntimeError: broken digest"),
        (lambda: RaisingDigest(TypeError("typed digest")), "TypeError: typed digest"),
        (lambda: RaisingDigest(RecursionError("deep digest")), "RecursionError|too deep|cycle"),
        (Hooked, "ValueError: hook refused"),
    ],
)
def test_an_argument_whose_digest_fails_runs_uncached_with_a_warning(make, cause):
    from fleche.digest import register_digest_hook

    register_digest_hook(Hooked, _refuse)
    runs = []

    @fleche(cache=memory_cache())
    def measure(data, scale=1):
        runs.append(scale)
        return scale * 2

    bad = make()
    for _ in range(2):
        with pytest.warns(FlecheWarning, match=f"measure ran uncached.*'data'.*({cause})"):
            assert measure(bad, scale=3) == 6
    assert runs == [3, 3]


def test_only_the_functions_own_errors_reach_the_caller():
    def plain(data, scale=1):
        raise ValueError("from the function")

    failing = fleche(cache=memory_cache())(plain)
    with pytest.warns(FlecheWarning), pytest.raises(ValueError, match="from the function"):
        failing(_cyclic_list())
    with pytest.raises(TypeError) as expected:
        plain(1, 2, 3)
    with pytest.raises(TypeError) as got:
        failing(1, 2, 3)
    assert str(got.value) == str(expected.value)


def test_a_function_whose_captured_value_has_no_digest_runs_uncached():
    lock = threading.Lock()
    runs = []

    @fleche(cache=memory_cache())
    def locked(x):
        runs.append(x)
        with lock:
            return x

    with pytest.warns(FlecheWarning, match="locked ran uncached.*lock"):
        assert locked(1) == 1


# -- one module name for one script in every process ----------------------------------------------

POOL_SCRIPT = """
import dataclasses, json, multiprocessing, sys
from fleche import fleche
from fleche.caches import Cache
from fleche.storage import CallPickleFile, ValuePickleFile

ROOT, METHOD = sys.argv[1], sys.argv[2]
store = Cache(ValuePickleFile(ROOT + "/values"), CallPickleFile(ROOT + "/calls"))


@dataclasses.dataclass(frozen=True)
class Point:
    x: int


@fleche(cache=store)
def norm(p):
    return abs(p.x)


shift = fleche(cache=store)(lambda x, d=1: x + d)


def probe(x):
    return [norm.digest(Point(x)), norm.contains(Point(x)), norm(Point(x)), shift.digest(x), shift(x)]


if __name__ == "__main__":
    for x in range(3):
        norm(Point(x)), shift(x)
    with multiprocessing.get_context(METHOD).Pool(2) as pool:
        seen = pool.map(probe, range(4))
    print(json.dumps({
        "parent": [[norm.digest(Point(x)), shift.digest(x)] for x in range(4)],
        "workers": seen,
        "calls": len(list(store.calls.list())),
    }))
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_a_script_keys_its_functions_alike_in_every_pool_worker(tmp_path, method):
    import json
    import os
    import pathlib
    import subprocess
    import sys

    script = tmp_path / "sweep.py"
    script.write_text(POOL_SCRIPT)
    src = str(pathlib.Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store"), method], capture_output=True,
        text=True, check=True, env=dict(os.environ, PYTHONPATH=src), cwd=tmp_path, timeout=120,
    )
    result = json.loads(out.stdout)
    for x, (worker, parent) in enumerate(zip(result["workers"], result["parent"])):
        assert [worker[0], worker[3]] == parent
        assert worker[1] == (x < 3)  # the parent's results are hits in the workers
        assert worker[2] == x and worker[4] == x + 1
    assert result["calls"] == 8  # four points, four shifts: nothing stored twice


class Guarded:
    """Digests (as a constant), but does not pickle: it holds a lock."""

    def __init__(self):
        self.lock = threading.Lock()

    def __digest__(self):
        return "guarded"


GUARD = Guarded()


def reads_a_guard(x):
    with GUARD.lock:
        return x


def test_a_hash_code_function_pickles_by_its_settings_after_a_call():
    cached = fleche(cache=memory_cache(), hash_code=True)(reads_a_guard).__fleche__
    assert cached.run((1,), {}) == 1 and cached.run((1,), {}) == 1
    copy = pickle.loads(pickle.dumps(cached))
    assert copy.func is reads_a_guard and copy.hash_code
    assert copy.make_call((1,), {}).to_lookup_key() == cached.make_call((1,), {}).to_lookup_key()


def test_a_closure_is_keyed_by_what_it_captured_when_decorated():
    """The key of a closure is taken at decoration, so changing a captured value in place
    before (or while threads race) the first call does not give each caller another key."""
    cache = memory_cache()
    log = []
    first = fleche(cache=cache)(lambda x: (log.append(x), x * 2)[1])
    second = fleche(cache=cache)(lambda x: (log.append(x), x * 2)[1])
    log.append("changed in place before the first call")
    assert first(1) == 2 and second(1) == 2
    assert log == ["changed in place before the first call", 1]  # the second call was a hit


# -- expire= ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_once", [False, True])
@pytest.mark.parametrize("expire", [3600, datetime.timedelta(hours=1)])
def test_a_call_older_than_expire_is_computed_again_and_replaced(tmp_path, expire, compute_once):
    from fleche.caches import Cache
    from fleche.query import start_time
    from fleche.storage import CallPickleFile, ValuePickleFile

    store = Cache(ValuePickleFile(tmp_path / "values"), CallPickleFile(tmp_path / "calls"))
    runs = []

    @fleche(cache=store, expire=expire, compute_once=compute_once)
    def area(r):
        runs.append(r)
        return 3 * r * r

    two_hours_ago = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2)).isoformat()
    ten_minutes_ago = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=10)).isoformat()
    store.save(area.call(1).replace(result=-1, metadata={"runtime": {"start": two_hours_ago}}))
    store.save(area.call(2).replace(result=12, metadata={"runtime": {"start": ten_minutes_ago}}))
    store.save(area.call(3).replace(result=-3))  # no start recorded: its age is unknown
    assert area(1) == 3 and area(2) == 12 and area(3) == 27
    assert runs == [1, 3]
    replaced = store.load(area.digest(1))
    assert replaced.result == 3 and start_time(replaced) > datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    assert area(1) == 3 and area(3) == 27 and runs == [1, 3]  # fresh now: hits


def test_expire_takes_a_duration():
    for bad, error in [(-1, ValueError), ("1h", TypeError), (True, TypeError)]:
        with pytest.raises(error, match="expire="):
            fleche(expire=bad)(lambda x: x)
    assert fleche(expire=0)(lambda x: x)(1) == 1
